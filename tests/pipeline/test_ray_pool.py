"""Ray actor pools for the stage chain: same records as in-process, fan-out, dead actors, load errors."""

from __future__ import annotations

import gc
import io
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import annotators
from data_schemas import AnnotateConfig, ConfigError, ImageLimits, load_config
from data_schemas.config import RayConfig, StageResources
from pipeline import ray_images
from pipeline.chain_runner import ChainMetrics
from pipeline.ingest import ingest_item
from pipeline.ray_pool import build_ray_chain, stage_backends, stage_resources, start_ray
from pipeline.sources.base import SourceItem
from pipeline.stages import Chain

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "flows"))
import helpers_backends  # noqa: E402  (test backends Ray workers can import)

helpers_backends.register_all()
WIDTHS = [40, 41, 42, 43, 44, 45, 46]
BAD, OOM = 42, 45


def _items():
    def png(width):
        buffer = io.BytesIO()
        Image.new("RGB", (width, 30), (20, 90, 160)).save(buffer, format="PNG")
        return buffer.getvalue()

    return [ingest_item(SourceItem(f"k{w}", f"k{w}.png", png(w)), "test", ImageLimits()) for w in WIDTHS]


def _annotate(**tagger) -> AnnotateConfig:
    return AnnotateConfig(tagger={"backend": "test-tagger", **tagger}, detectors={"a": {"backend": "test-detector"}})


def _ray_cfg(**kw) -> RayConfig:
    settings = {"num_cpus": 2, "runtime_env": helpers_backends.ray_env(), "batch_size": 3, "max_in_flight": 2,
                "actor_start_timeout_s": 60}
    return RayConfig(**{**settings, **kw})


@pytest.fixture(scope="module")
def local_ray():
    import ray

    owned = start_ray(_ray_cfg())
    yield ray
    if owned:
        ray.shutdown()


def _summary(items):
    return [(it.record.key, it.error, [t.name for t in it.record.tags],
             [(r.label, r.box_xyxy, r.annotator) for r in it.record.regions], it.record.provenance) for it in items]


def test_stage_names_and_resources_follow_the_config(monkeypatch):
    monkeypatch.setattr("annotators.build", lambda kind, cfg: helpers_backends.ScriptedTagger())
    cfg = AnnotateConfig(tagger={"backend": "t"}, captioners={"b": {"backend": "c"}}, scorer={"backend": "s"},
                         detectors={"x": {"backend": "d"}, "y": {"backend": "d"}},
                         region_captioners={"r": {"backend": "r"}}, segmenter={"backend": "sam"},
                         background={"backend": "bg"})
    model_stages = {s.name for s in Chain.from_config(cfg).stages if s.annotator is not None}
    assert set(stage_backends(cfg)) == model_stages - {"stability"}  # stability shares the segmenter's pool
    ray_cfg = RayConfig(resources={"detector": StageResources(num_gpus=0.5), "detector_y": StageResources(num_gpus=1)})
    assert stage_resources(ray_cfg, "detector_x", "detector").num_gpus == 0.5
    assert stage_resources(ray_cfg, "detector_y", "detector").num_gpus == 1
    assert stage_resources(ray_cfg, "tagger", "tagger") == ray_cfg.default


@pytest.mark.parametrize(("mode", "share"), [("stages", True), ("stages", False), ("chain", True)])
def test_ray_chain_gives_the_same_records_and_error_rows_as_in_process(local_ray, mode, share):
    annotate = _annotate(fail_width=BAD, oom_width=OOM)
    local = Chain.from_config(annotate)
    local.load()
    expected = local(_items())
    chain = build_ray_chain(annotate, _ray_cfg(mode=mode, share_images=share,
                                               resources={"chain": StageResources(pool_size=2)}))
    items = _items()
    ray_images.STATS.reset()
    try:
        metrics = ChainMetrics()
        got = chain.run(items, metrics)
    finally:
        chain.close()
    assert _summary(got) == _summary(expected)
    pixels = sum(ray_images.pixel_bytes(it.decoded.image) for it in items)
    if mode == "stages" and share:  # tagger and detector (and the tagger's retries) share one put per image
        assert (ray_images.STATS.put, ray_images.STATS.inline) == (pixels, 0)
    elif mode == "stages":  # every call pickles its images: the tagger's 7, its retries, the detector's 5
        assert ray_images.STATS.put == 0 and ray_images.STATS.inline > pixels + 5 / 7 * pixels
    errors = {it.record.key: it.error for it in got if it.error}
    assert set(errors) == {f"k{BAD}", f"k{OOM}"}
    assert errors[f"k{OOM}"].startswith("annotator_failed: tagger: RuntimeError: CUDA out of memory")
    assert metrics.boxes_detected == 2 * 5 and metrics.boxes_kept == 5  # detector runs on the 5 good images
    assert metrics.stage_failed["tagger"] == 2


def test_shared_images_are_put_once_per_size_and_resolve_in_place(local_ray):
    big, small = Image.new("RGB", (400, 100), (1, 2, 3)), Image.new("RGB", (20, 10))
    shared = ray_images.SharedImages()
    first = shared.refs([big, small])
    assert shared.refs([big, small]) == first and len(shared) == 2
    scaled = shared.refs([big, small], max_side=64)
    assert scaled[0] != first[0] and scaled[1] != first[1] and len(shared) == 4
    got = ray_images.resolve([scaled, [np.zeros(4)] * 2])
    assert got[0][0].size == (64, 16) and got[0][0].getpixel((3, 3)) == (1, 2, 3)
    assert got[0][1].size == (20, 10)  # already small: sent as it is
    assert got[1][0].shape == (4,)  # non-image arguments pass unchanged
    del big
    gc.collect()
    assert len(shared) == 2  # the entries of an image go with it


def test_shared_images_stay_under_their_capacity(local_ray):
    images = [Image.new("RGB", (100, 100)) for _ in range(5)]
    shared = ray_images.SharedImages(capacity_bytes=3 * 100 * 100 * 3)
    shared.refs(images)
    assert len(shared) == 3  # the two oldest were dropped; asking again puts them again


def test_max_side_is_refused_on_stages_with_pixel_outputs(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("annotate: {tagger: {backend: t}, detectors: {a: {backend: d}}}\n"
                    "ray: {resources: {tagger: {max_side: 512}, detector_a: {max_side: 512}}}\n")
    with pytest.raises(ConfigError, match=r"max_side on \['detector_a'\]: their outputs are pixel boxes"):
        load_config(path)


def test_pool_fans_a_batch_out_over_its_actors(local_ray, tmp_path):
    log = tmp_path / "calls.log"
    cfg = _ray_cfg(resources={"tagger": StageResources(pool_size=2, batch_size=1, num_cpus=0.25)})
    chain = build_ray_chain(AnnotateConfig(tagger={"backend": "test-tagger", "log": str(log), "delay_s": 0.2}), cfg)
    try:
        chain.run(_items())
    finally:
        chain.close()
    calls = [line.split() for line in log.read_text().splitlines()]
    assert len(calls) == len(WIDTHS) and {n for _, n, _ in calls} == {"1"}
    assert len({pid for pid, _, _ in calls}) == 2


@pytest.mark.parametrize("mode", ["stages", "chain"])
def test_killed_actor_is_replaced_and_its_inputs_retried_on_the_replacement(local_ray, mode):
    chain = build_ray_chain(AnnotateConfig(tagger={"backend": "test-tagger"}), _ray_cfg(mode=mode))
    try:
        pool = chain.pools[0]
        local_ray.kill(pool.actors[0])
        items = chain.run(_items())  # the dead actor's chunk is bisected onto the replacement, nothing lost
        assert pool.replaced >= 1
        assert all(it.error is None and it.record.tags for it in items)
    finally:
        chain.close()


@pytest.mark.slow  # several worker restarts (in chain mode each loads the chain)
@pytest.mark.parametrize("mode", ["stages", "chain"])
def test_a_poison_input_that_kills_every_worker_is_one_error_row(local_ray, mode):
    """Issue 20 class 7: an input that ends its worker process every time (os._exit) is bisected across worker
    restarts to one ``worker_lost`` error row; the rest of the batch is annotated, no WorkerLost escapes."""
    chain = build_ray_chain(AnnotateConfig(tagger={"backend": "test-tagger", "exit_width": BAD}),
                            _ray_cfg(mode=mode))
    try:
        items = chain.run(_items())
        errors = {it.record.key: it.error for it in items if it.error}
        assert list(errors) == [f"k{BAD}"] and errors[f"k{BAD}"].startswith("worker_lost: ")
        assert all(it.record.tags for it in items if it.error is None)
        assert chain.pools[0].replaced >= 2  # it killed a worker at least twice
    finally:
        chain.close()


def test_a_call_queued_behind_a_poison_call_is_sent_again_not_blamed(local_ray, tmp_path):
    """A death fails every call queued on the actor; only the running one is the input's fault
    (``pipeline.call_ledger``). The queued chunk runs once, on the replacement; the poison chunk raises."""
    log = tmp_path / "calls.log"
    cfg = _ray_cfg(resources={"tagger": StageResources(pool_size=1, batch_size=1, num_cpus=0.25)})
    chain = build_ray_chain(AnnotateConfig(tagger={"backend": "test-tagger", "exit_width": BAD, "log": str(log),
                                                   "delay_s": 0.2}), cfg)
    try:
        pool = chain.pools[0]
        images = [item.decoded.image for item in _items() if item.decoded.image.width in (BAD, 40)]
        assert [image.width for image in images] == [40, BAD]
        with pytest.raises(annotators.WorkerLost):
            pool.call(images[::-1])  # the poison first, then a good image queued behind it on the same actor
        calls = [line.split() for line in log.read_text().splitlines()]
        poison_pid = next(pid for pid, _, width in calls if int(width) == BAD)
        good = [pid for pid, _, width in calls if int(width) == 40]
        assert len(good) == 1 and good[0] != poison_pid  # ran once, on the replacement
        assert pool.replaced == 1
    finally:
        chain.close()


def _run_in_task(chain, items):
    """``chain.run(items)`` in a Ray task, as a concurrent shard task runs it (the chain's pools pickled)."""
    import ray

    def run(chain, items):
        return [(it.record.key, it.error, [t.name for t in it.record.tags]) for it in chain.run(items)]

    return ray.remote(run).options(num_cpus=0.25, max_retries=0).remote(chain, items)


def _wait_dead(actor, timeout_s: float = 60.0) -> None:
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.info.remote(), timeout=timeout_s)
        except ray.exceptions.RayActorError:
            return
    raise AssertionError("the killed actor still answers")


@pytest.mark.parametrize("mode", ["stages", "chain"])
def test_a_poison_input_in_a_shard_task_is_one_error_row_through_the_pools_keeper(local_ray, mode):
    """Issue 20 class 7 in concurrent-shard mode: a shard task cannot start actors, so with one actor per pool a
    poison input used to leave it none (``WorkerLost``: the whole shard failed). Shared, the pool's keeper actor
    starts the replacements the task's bisection needs; the driver's view counts them too."""
    one = StageResources(pool_size=1, batch_size=2, num_cpus=0.25)
    cfg = _ray_cfg(mode=mode, resources={"tagger": one, "chain": one})
    chain = build_ray_chain(AnnotateConfig(tagger={"backend": "test-tagger", "exit_width": BAD}), cfg)
    try:
        pool = chain.pools[0]
        pool.share()
        rows = local_ray.get(_run_in_task(chain, _items()))
        errors = {key: error for key, error, _ in rows if error}
        assert list(errors) == [f"k{BAD}"] and errors[f"k{BAD}"].startswith(f"worker_lost: {pool.label}: ")
        assert all(tags == [f"w{key[1:]}"] for key, error, tags in rows if error is None)
        assert pool.replaced >= 2  # the poison killed a worker at least twice; the keeper replaced each
        assert pool.heal() == 0 and len(pool.actors) == 1  # one live actor, the same in the driver's view
    finally:
        chain.close()


def test_one_dead_actor_reported_by_two_shard_tasks_is_replaced_once(local_ray):
    """The keeper replaces a dead actor once, however many processes report it; both tasks' calls, queued on the
    dead actor and never run there, are sent again to the replacement (``pipeline.call_ledger``)."""
    cfg = _ray_cfg(resources={"tagger": StageResources(pool_size=1, batch_size=7, num_cpus=0.25)})
    chain = build_ray_chain(AnnotateConfig(tagger={"backend": "test-tagger"}), cfg)
    try:
        pool = chain.pools[0]
        pool.share()
        dead = pool.actors[0]
        local_ray.kill(dead, no_restart=True)  # the keeper is not told: the tasks find out by calling it
        _wait_dead(dead)
        runs = [_run_in_task(chain, _items()) for _ in range(2)]
        for rows in local_ray.get(runs):
            assert [(key, error) for key, error, _ in rows] == [(f"k{w}", None) for w in WIDTHS]
        assert pool.replaced == 1
        assert pool.heal() == 0 and len(pool.actors) == 1 and dead not in pool.actors
    finally:
        chain.close()


def test_a_call_running_on_a_recycled_actor_is_sent_again_not_blamed(local_ray, tmp_path):
    """The pool kills its actors on purpose after a breaker trip (``recycle``); the calls they fail that way are
    no input's fault (``call_ledger.retire``): a call running meanwhile in another thread ends on the replacement."""
    import threading

    log = tmp_path / "calls.log"
    cfg = _ray_cfg(resources={"tagger": StageResources(pool_size=1, batch_size=1, num_cpus=0.25)})
    chain = build_ray_chain(AnnotateConfig(tagger={"backend": "test-tagger", "log": str(log), "delay_s": 5}), cfg)
    try:
        pool = chain.pools[0]
        image = _items()[0].decoded.image
        result: dict = {}
        caller = threading.Thread(target=lambda: result.update(out=_outcome(pool.call, [image])), daemon=True)
        caller.start()
        deadline = time.monotonic() + 60
        while not (log.exists() and log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)  # the call has started (the backend logs, then sleeps 5 s)
        assert pool.recycle() == 1
        caller.join(timeout=120)
        assert not isinstance(result["out"], BaseException), result["out"]
        assert len(result["out"]) == 1
        assert len({line.split()[0] for line in log.read_text().splitlines()}) == 2  # it ran again, elsewhere
    finally:
        chain.close()


def _outcome(call, *args):
    try:
        return call(*args)
    except BaseException as exc:  # noqa: BLE001 - handed to the test thread
        return exc


def test_an_actor_failing_call_after_call_is_replaced(local_ray, tmp_path):
    """Issue 20 class 7: a sticky device error (every call fails) gets the actor replaced, not reused forever."""
    broken = tmp_path / "gpu-broken"
    broken.touch()
    cfg = _ray_cfg(resources={"tagger": StageResources(pool_size=1, batch_size=1, num_cpus=0.25)})
    chain = build_ray_chain(AnnotateConfig(tagger={"backend": "test-tagger", "broken_marker": str(broken)}), cfg)
    try:
        pool = chain.pools[0]
        for _ in range(2):
            items = chain.run(_items())
        assert all(it.error and it.error.startswith("annotator_failed: tagger") for it in items)
        replaced = pool.replaced
        assert replaced >= 1  # every 10th failure in a row replaces the actor
        broken.unlink()  # the replacement works once the device does
        assert all(it.error is None for it in chain.run(_items()))
        assert chain.recycle("tagger") == 1 and pool.replaced == replaced + 1  # a breaker trip replaces them all
    finally:
        chain.close()


def test_load_failure_and_unschedulable_pool_are_named(local_ray):
    with pytest.raises(annotators.AnnotatorError, match="tagger: the backend failed to load: FileNotFoundError"):
        build_ray_chain(AnnotateConfig(tagger={"backend": "test-tagger", "fail_load": "/m.pt"}), _ray_cfg())
    too_big = _ray_cfg(resources={"tagger": StageResources(num_cpus=3)}, actor_start_timeout_s=1)
    with pytest.raises(annotators.AnnotatorError, match="not ready after 1 s; is there room"):
        build_ray_chain(AnnotateConfig(tagger={"backend": "test-tagger"}), too_big)
