"""GPUs reach the model stages: Ray's logical GPUs on a CPU machine (``ray.init(num_gpus=...)``) stand in for
real ones. Each pool's actors see the ``CUDA_VISIBLE_DEVICES`` their ``num_gpus`` implies; ``configs/umg41m.yaml``
places every model stage on a GPU; a stage that asks for CUDA and gets none fails loudly; a stage's
``runtime_env`` (its own interpreter) reaches its actors and a broken optional package shows its real error."""

from __future__ import annotations

import stat
import sys
from collections import Counter
from pathlib import Path

import pytest

import annotators
from data_schemas import AnnotateConfig, ConfigError, load_config
from data_schemas.config import RayConfig, StageResources
from pipeline.ray_pool import ActorPool, build_ray_chain, pin_devices, start_ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "flows"))
import helpers_backends  # noqa: E402  (test backends Ray workers can import)

helpers_backends.register_all()
ROOT = Path(__file__).resolve().parents[2]
N_GPUS = 8  # logical: one 8-GPU node


def _ray_cfg(**kw) -> RayConfig:
    settings = {"num_cpus": 2, "num_gpus": N_GPUS, "runtime_env": helpers_backends.ray_env(),
                "actor_start_timeout_s": 60}
    return RayConfig(**{**settings, **kw})


@pytest.fixture(scope="module")
def gpu_ray():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    owned = start_ray(_ray_cfg())
    assert ray.cluster_resources().get("GPU") == N_GPUS
    yield ray
    if owned:
        ray.shutdown()


def _pool(label: str, resources: StageResources, backend: str = "test-tagger", **cfg) -> ActorPool:
    cls = annotators.registry.resolve("tagger", backend)
    # a deadline, not a timing: the planned umg41m layout starts 31 actors, slow on 2 busy cores
    pool = ActorPool(label, cls, {"backend": backend, **cfg}, resources, start_timeout_s=600)
    pool.wait_ready()
    return pool


def _visible(pool: ActorPool) -> list[list[str]]:
    return [(p["cuda_visible_devices"] or "").split(",") if p["cuda_visible_devices"] else [] for p in pool.placements]


def test_each_pool_sees_the_gpus_its_num_gpus_implies(gpu_ray):
    pools = {
        "halves": _pool("halves", StageResources(num_cpus=0.1, num_gpus=0.5, pool_size=2)),
        "whole": _pool("whole", StageResources(num_cpus=0.1, num_gpus=1, pool_size=1)),
        "pair": _pool("pair", StageResources(num_cpus=0.1, num_gpus=2, pool_size=1)),
        "cpu": _pool("cpu", StageResources(num_cpus=0.1, num_gpus=0, pool_size=1)),
    }
    try:
        seen = {label: _visible(pool) for label, pool in pools.items()}
        assert [len(ids) for ids in seen["halves"]] == [1, 1]
        assert [len(ids) for ids in seen["whole"]] == [1] and [len(ids) for ids in seen["pair"]] == [2]
        assert seen["cpu"] == [[]]  # Ray hides every GPU from an actor without num_gpus
        for pool in pools.values():  # what Ray assigned is what the process sees
            assert all(sorted(p["gpu_ids"]) == sorted(ids) for p, ids in zip(pool.placements, _visible(pool)))
        whole_gpus = seen["whole"][0] + seen["pair"][0]
        assert len(set(whole_gpus)) == 3, "whole GPUs are never shared"
        assert not set(whole_gpus) & {i for ids in seen["halves"] for i in ids}
    finally:
        for pool in pools.values():
            pool.close()


def test_umg41m_validates_and_places_every_model_stage_on_a_gpu(gpu_ray):
    cfg = load_config(ROOT / "configs" / "umg41m.yaml")
    stages = cfg.annotate.model_stages()
    assert {"tagger", "captioner_blip2", "scorer", "detector_bigdet", "detector_v3det", "region_captioner_vlm",
            "segmenter", "background"} <= set(stages)
    resources = {stage: cfg.ray.resources_for(stage, kind) for stage, (kind, _) in stages.items()}
    assert all(r.num_gpus > 0 for r in resources.values()), {s: r.num_gpus for s, r in resources.items()}
    assert sum(r.num_gpus * r.pool_size for r in resources.values()) <= N_GPUS  # fits one 8-GPU node
    pinned = pin_devices(cfg.annotate, cfg.ray).model_stages()  # every real backend takes `device`
    assert {stage: backend.get("device") for stage, (_, backend) in pinned.items()} == dict.fromkeys(stages, "cuda")

    # The same GPU figures under Ray (a probe backend instead of the 7B models; CPUs scaled to this machine).
    pools = [_pool(stage, r.model_copy(update={"num_cpus": 0.05, "runtime_env": None}))
             for stage, r in resources.items()]
    try:
        placed = Counter()
        for pool, r in zip(pools, resources.values()):
            visible = _visible(pool)
            assert len(visible) == r.pool_size and all(len(ids) == max(1, int(r.num_gpus)) for ids in visible), (
                pool.label, visible)
            for ids in visible:
                placed.update({i: r.num_gpus / len(ids) for i in ids})
        assert all(share <= 1.0 for share in placed.values()), placed  # no GPU over-committed
    finally:
        for pool in pools:
            pool.close()


def test_a_stage_asking_for_cuda_without_a_gpu_fails_loudly(gpu_ray):
    # num_gpus > 0 turns device auto into cuda: on this CPU-only torch the load fails, no CPU fallback.
    cfg = AnnotateConfig(tagger={"backend": "test-device-tagger"})
    gpu = _ray_cfg(resources={"tagger": StageResources(num_cpus=0.1, num_gpus=0.5)})
    with pytest.raises(annotators.AnnotatorError, match=r"tagger: the backend failed to load: .*device 'cuda' "
                                                        r"requested but CUDA is not available.*not falling back"):
        build_ray_chain(cfg, gpu)
    # device cuda in a stage Ray gives no GPU: refused before any actor starts.
    cuda_cfg = AnnotateConfig(tagger={"backend": "test-device-tagger", "device": "cuda"})
    with pytest.raises(annotators.AnnotatorError, match=r"tagger: device 'cuda' but its Ray actors get num_gpus 0"):
        build_ray_chain(cuda_cfg, _ray_cfg())
    # without GPUs, auto stays auto (the CPU smoke layout)
    chain = build_ray_chain(cfg, _ray_cfg(resources={"tagger": StageResources(num_cpus=0.1)}))
    chain.close()


def test_config_schema_names_bad_resources(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("annotate: {tagger: {backend: t}}\nray: {resources: {taggr: {num_gpus: 1}}}\n")
    with pytest.raises(ConfigError, match=r"ray.resources: \['taggr'\] name no configured stage; stages: \['tagger'\]"):
        load_config(path)
    path.write_text("ray: {default: {num_gpus: 1.5}}\n")
    with pytest.raises(ConfigError, match=r"ray.default.num_gpus: .*above 1 must be a whole number"):
        load_config(path)


def _fake_env(root: Path, module: str, body: str) -> Path:
    """A Python "environment" that only differs by one importable module: a wrapper around this interpreter."""
    site = root / "site"
    site.mkdir(parents=True)
    (site / f"{module}.py").write_text(body)
    python = root / "bin" / "python"
    python.parent.mkdir()
    python.write_text(f'#!/bin/sh\nexport PYTHONPATH="{site}:$PYTHONPATH"\nexec "{sys.executable}" "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return python


def test_stage_runtime_env_runs_its_actors_in_their_own_environment(gpu_ray, tmp_path):
    python = _fake_env(tmp_path / "env", "umg_fake_ram", "VERSION = 'fake-ram-1'\n")
    own_env = StageResources(num_cpus=0.1, runtime_env={"py_executable": str(python)})
    pool = _pool("tagger", own_env, backend="test-device-tagger", requires="umg_fake_ram", device="cpu")
    try:
        assert pool.version == "fake-ram-1"  # the module only that environment has was imported
    finally:
        pool.close()
    with pytest.raises(annotators.AnnotatorError, match=r"umg_fake_ram is not installed in"):
        _pool("tagger", StageResources(num_cpus=0.1), backend="test-device-tagger", requires="umg_fake_ram",
              device="cpu")


def test_a_broken_optional_package_shows_its_real_import_error(tmp_path, monkeypatch):
    # RAM under transformers 5: the package is there, one of its own imports is not.
    (tmp_path / "umg_broken_ram.py").write_text("from transformers.modeling_utils import a_removed_helper\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(annotators.BrokenDependencyError,
                       match=r"umg_broken_ram is installed in .* but fails to import: ImportError: cannot import "
                             r"name 'a_removed_helper'"):
        annotators.base.require("umg_broken_ram", "hint")
    with pytest.raises(annotators.MissingDependencyError, match=r"umg_absent_pkg.models is not installed in .*: hint"):
        annotators.base.require("umg_absent_pkg.models", "hint")
