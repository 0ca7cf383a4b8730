"""The Ray Train launcher (``distributed.launcher: ray``): 2 Ray Train workers train exactly as 2 torchrun/gloo
ranks do, on a local Ray bound to 127.0.0.1 that ``train()`` starts and shuts down itself.

2 gloo ranks x batch b == 1 process x batch 2b is tests/model/test_distributed_train.py; here the same 2-rank
run is launched both ways (same shards, seeds, global batch 2b) and must agree step for step.
"""

from __future__ import annotations

import csv
import math
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import model
import ray_runtime
from data_schemas import TrainConfig
from model import launch
from model.checkpoint import WEIGHTS, load_train_state
from model.launch import free_port, run_with_ray
from model.trainer import resolve_tars, train, train_rank
from pipeline.sample_shards import write_sample_shards

B, STEPS = 4, 3
LOSSES = ("loss", "image_caption_loss", "region_caption_loss", "image_tag_loss", "region_tag_loss", "grad_norm")


def _config(**distributed) -> TrainConfig:
    return TrainConfig.model_validate({
        "batch_size": B, "steps": STEPS, "seed": 3, "optim": {"lr": 1e-3, "visual_lr": 2e-3},
        "data": {"workers": 0, "resampled": True},  # one shard for 2 ranks: resampled, as on a cluster
        "distributed": {"backend": "gloo", **distributed},
        "progress": False, "tensorboard": False, "plot": False})


def _torchrun_rank(rank: int, world: int, port: int, tars: list, out: str) -> None:
    """What ``torchrun --nproc-per-node 2 -m flows.cli train ...`` runs on each rank."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # as Ray does for a 1-CPU worker (OMP_NUM_THREADS=1)
    train(_config(), tars, out)


def _rows(path) -> list[dict[str, float]]:
    with open(path, newline="") as handle:
        return [{k: float(row[k]) for k in ("step", *LOSSES)} for row in csv.DictReader(handle)]


def _listening(ray, psutil) -> set[str]:
    """Addresses the local Ray's processes (gcs, raylet, dashboard, agents, workers) listen on."""
    node = ray._private.worker._global_node
    roots = [psutil.Process(info.process.pid) for infos in node.all_processes.values() for info in infos]
    addresses = set()
    for proc in [*roots, *(child for root in roots for child in root.children(recursive=True))]:
        try:
            addresses |= {c.laddr.ip for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:  # gone meanwhile
            pass
    return addresses


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_sample_shards(out, n=24, seed=2)
    return resolve_tars(out / "train")


@pytest.mark.e2e
@pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")  # ray.train imports ray.data
def test_two_ray_workers_match_two_torchrun_ranks(tars, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.train", reason="needs ray[train] (pip install 'ray[train]==2.60.0')")
    psutil = pytest.importorskip("psutil")

    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process: the launcher would use it as it is")
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # the driver sees the end sooner
    for name in ray_runtime.ADDRESS_ENV:
        monkeypatch.delenv(name, raising=False)
    seen = {}
    start = launch.start_ray_for_training

    def spy(section):
        seen["owned"] = start(section)
        seen["nodes"] = [node["NodeManagerAddress"] for node in ray.nodes()]
        seen["listening"] = _listening(ray, psutil)
        seen["cpus"] = ray.cluster_resources().get("CPU")
        return seen["owned"]

    monkeypatch.setattr(launch, "start_ray_for_training", spy)
    try:
        result = train(_config(launcher="ray", ray_num_workers=2), tars, tmp_path / "ray")
        assert not ray.is_initialized()  # the launcher started Ray, so it shut it down
    finally:
        if ray.is_initialized():
            ray.shutdown()

    # Loopback only: the node, and every socket Ray's processes listen on.
    assert seen["owned"] and seen["nodes"] == ["127.0.0.1"] and seen["cpus"] >= 2
    assert seen["listening"] and seen["listening"] <= {"127.0.0.1", "::ffff:127.0.0.1"}, seen["listening"]

    mp.spawn(_torchrun_rank, args=(2, free_port(), tars, str(tmp_path / "torchrun")), nprocs=2, join=True)

    # The same run: every step's losses and gradient norm, and the final weights.
    assert result.steps == STEPS and result.checkpoint.parent == tmp_path / "ray" / "checkpoints"
    ray_rows, ref_rows = _rows(result.metrics_csv), _rows(tmp_path / "torchrun" / "metrics.csv")
    assert [r["step"] for r in ray_rows] == [r["step"] for r in ref_rows] == [1.0, 2.0, 3.0]
    for got, want in zip(ray_rows, ref_rows):
        for key in LOSSES:
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-8), (got["step"], key)
    assert result.final_losses == pytest.approx({k: ray_rows[-1][k] for k in result.final_losses}, rel=1e-6)
    assert all(math.isfinite(v) for v in result.final_losses.values()) and result.final_losses["region_tag_loss"] > 0
    got = load_file(result.checkpoint / WEIGHTS)
    want = load_file(tmp_path / "torchrun" / "checkpoints" / result.checkpoint.name / WEIGHTS)
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-6, atol=1e-8, msg=name)

    # Both ranks took part (their saved RNG streams differ); the checkpoint reloads.
    state = load_train_state(result.checkpoint)
    assert state["step"] == STEPS and state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert model.load_checkpoint(tmp_path / "ray") is not None


def test_ray_launcher_fails_clearly_without_ray_train(tars, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray.train", None)  # what a Ray without the [train] extra looks like
    with pytest.raises(RuntimeError, match=r"pip install 'ray\[train\]==2.60.0'"):
        run_with_ray(TrainConfig(distributed={"launcher": "ray"}), tars, tmp_path, train_rank)
