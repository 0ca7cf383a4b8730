"""The ``build-umg41m`` flow against a real local Prefect server and a real local Ray (no mocks).

Reliability: a bad image and an OOM-like batch become error rows while the shard completes; a Ray actor
killed mid-shard is replaced and its call retried inside the task (no duplicates, no loss); ``kill -9`` of the
whole build process and a rerun give every input exactly once with no partial shard visible; an input that
kills its worker every time ends as one ``worker_lost`` error row (bisected across worker restarts).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers_backends import kill_9_build_when, wait_gone, write_config

from data_schemas import SourceConfig
from flows.build import COMPLETED_EVENT, build_umg41m
from flows.services import api
from pipeline.shard_build import pin_plan
from pipeline.shards import finished_shards, read_shard_rows, shard_paths, stray_pieces
from pipeline.sources.registry import build_source
from pipeline.validate import validate_build


def _rows(build_dir: Path) -> list[dict]:
    return [row for name in finished_shards(build_dir) for row in read_shard_rows(build_dir, name)]


def _assert_every_input_once(raw: Path, build_dir: Path) -> list[dict]:
    source = build_source(SourceConfig(path=raw))
    keys = [item.key for item in source.read(source.list_refs())]
    rows = _rows(build_dir)
    assert Counter(row["key"] for row in rows) == Counter(keys), "an input is missing or written twice"
    assert len(finished_shards(build_dir)) == len(pin_plan(build_dir, source, 4))
    report = validate_build(build_dir)
    assert report.ok, report.problems
    return rows


def _widths(raw: Path) -> dict[str, int]:
    """sample key -> image width, for the images whose width no other image has."""
    from PIL import Image

    widths = {}
    for path in sorted((raw / "images").rglob("*.jpg")):
        with Image.open(path) as image:
            widths[path.stem] = image.width
    counts = Counter(widths.values())
    return {ref: w for ref, w in widths.items() if counts[w] == 1}


def _run_id(state) -> str:
    return str(state.state_details.flow_run_id)


def _events(run_id: str, wait_s: float) -> list:
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    deadline = time.monotonic() + wait_s
    with api(None) as client:
        while True:
            page = client.read_events(EventFilter(
                event=EventNameFilter(name=[COMPLETED_EVENT]),
                resource=EventResourceFilter(id=[f"umg.build.{run_id}"])), limit=50)
            if page.events or time.monotonic() > deadline:
                return page.events
            time.sleep(0.5)


def _task_runs(run_id: str) -> dict[str, int]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with api(None) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    return {run.name: run.run_count for run in runs}


def _artifact(key: str):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with api(None) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return sorted(found, key=lambda a: a.created)[-1]


def test_bad_image_and_oom_batch_become_error_rows_and_reports_are_written(prefect_server, sample_raw, tmp_path):
    unique = _widths(sample_raw)
    (bad_ref, bad_w), (oom_ref, oom_w) = list(unique.items())[:2]
    log = tmp_path / "tagger.log"
    cfg = write_config(tmp_path / "c.yaml", {
        "tagger": {"backend": "test-tagger", "fail_width": bad_w, "oom_width": oom_w, "log": str(log)},
        "detectors": {"a": {"backend": "test-detector"}}})
    out = tmp_path / "out"
    state = build_umg41m(str(cfg), str(sample_raw), str(out), return_state=True)
    assert state.is_completed(), state.message
    rows = {row["key"]: row for row in _assert_every_input_once(sample_raw, out)}
    assert rows[bad_ref]["error"].startswith("annotator_failed: tagger: ValueError: cannot tag")
    assert rows[oom_ref]["error"].startswith("annotator_failed: tagger: RuntimeError: CUDA out of memory")
    assert sum(row["status"] == "error" for row in rows.values()) == 2
    assert all(row["n_tags"] >= 1 for ref, row in rows.items() if ref not in (bad_ref, oom_ref))
    calls = [tuple(map(int, line.split()[1:])) for line in log.read_text().splitlines()]  # (n images, width)
    assert (1, bad_w) in calls and (1, oom_w) in calls, f"failing batches not split down to one image: {calls}"
    assert max(n for n, _ in calls) == 2  # stage batch_size

    run_id = _run_id(state)
    assert _events(run_id, wait_s=20), "no umg.build.completed event after a complete build"
    progress = _artifact("umg41m-build-progress")
    assert progress.data == 100.0
    table = _artifact("umg41m-build-shards").data
    assert "box_pass" in table and "00003" in table  # rows of every shard (JSON-encoded table)
    assert '"box_pass": 0.5' in table  # test detector: one box of two passes the 0.3 threshold
    qa = _artifact("umg41m-build-qa").data
    assert "complete" in qa and "overlay_" in qa
    overlays = sorted((out / "_qa").glob("overlay_*.png"))
    assert len(overlays) == 2 and all(str(p) in qa for p in overlays)
    assert set(_task_runs(run_id)) == {f"shard-{i:05d}" for i in range(4)}


def test_ray_actor_killed_mid_shard_is_replaced_and_the_shard_completes(prefect_server, sample_raw, tmp_path):
    import ray

    log = tmp_path / "tagger.log"
    cfg = write_config(tmp_path / "c.yaml", {"tagger": {"backend": "test-tagger", "delay_s": 0.4, "log": str(log)}})
    out = tmp_path / "out"
    killed: list[str] = []

    def kill_tagger_during_shard_1():
        deadline = time.monotonic() + 120
        while not shard_paths(out, "00000")[".stats.json"].exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        calls = len(log.read_text().splitlines())
        while len(log.read_text().splitlines()) <= calls and time.monotonic() < deadline:
            time.sleep(0.02)  # a call of shard 00001 is now in flight (it sleeps 0.4 s)
        name = next(n for n in ray.util.list_named_actors() if n.startswith("umg-tagger-"))
        ray.kill(ray.get_actor(name))
        killed.append(name)

    killer = threading.Thread(target=kill_tagger_during_shard_1, daemon=True)
    killer.start()
    state = build_umg41m(str(cfg), str(sample_raw), str(out), return_state=True)
    killer.join(timeout=5)
    assert killed and state.is_completed(), state.message
    rows = _assert_every_input_once(sample_raw, out)
    assert all(row["status"] == "ok" for row in rows)
    attempts = _task_runs(_run_id(state))  # the lost call was retried on the replacement inside the task
    assert all(count == 1 for count in attempts.values()), attempts
    assert len({line.split()[0] for line in log.read_text().splitlines()}) == 2  # a second actor process


def test_kill_9_of_the_whole_build_then_rerun_gives_every_input_once(flow_env, sample_raw, tmp_path):
    log = tmp_path / "tagger.log"
    cfg = write_config(tmp_path / "c.yaml", {"tagger": {"backend": "test-tagger", "delay_s": 0.3, "log": str(log)}})
    out = tmp_path / "out"
    seen: dict[str, int] = {}

    def half_way_through_shard_00002() -> bool:
        if not shard_paths(out, "00001")[".stats.json"].exists():
            return False
        calls = len(log.read_text().splitlines())
        return calls > seen.setdefault("calls", calls) + 1

    family = kill_9_build_when(cfg, sample_raw, out, half_way_through_shard_00002)
    assert 2 <= len(finished_shards(out)) < 4
    assert stray_pieces(out) == []  # no partial shard visible (only *.tmp files may be left)
    assert all(p.name.removesuffix(".tar") in finished_shards(out) for p in out.glob("*.tar"))
    wait_gone(family)  # Ray's processes shared the driver's fate

    state = build_umg41m(str(cfg), str(sample_raw), str(out), return_state=True)
    assert state.is_completed(), state.message
    rows = _assert_every_input_once(sample_raw, out)
    assert all(row["status"] == "ok" for row in rows)
    assert not list(out.glob("*.tmp"))


@pytest.mark.parametrize("flow", [{}, {"concurrent_shards": 2, "shard_num_cpus": 0.5}], ids=["driver", "shard-tasks"])
def test_an_input_that_kills_its_worker_every_time_is_one_error_row(prefect_server, sample_raw, tmp_path, flow):
    """Issue 20 class 7: a poison input (its worker process exits on it, every time) used to fail its shard after
    every retry, good inputs included. It is now bisected across worker restarts to one ``worker_lost`` row, also
    inside concurrent shard tasks (their pool clients have dead actors replaced by the pool's keeper actor)."""
    poison_ref, poison_w = next(iter(_widths(sample_raw).items()))
    cfg = write_config(tmp_path / "c.yaml", {"tagger": {"backend": "test-tagger", "exit_width": poison_w}},
                       flow={"shard_retries": 0, **flow})
    out = tmp_path / "out"
    state = build_umg41m(str(cfg), str(sample_raw), str(out), return_state=True)
    assert state.is_completed(), state.message
    rows = _assert_every_input_once(sample_raw, out)
    errors = {row["key"]: row["error"] for row in rows if row["status"] == "error"}
    assert list(errors) == [poison_ref] and errors[poison_ref].startswith("worker_lost: tagger: ")


def test_ground_truth_build_needs_no_ray_and_a_rerun_does_not_announce_again(prefect_server, sample_raw, tmp_path):
    import ray

    cfg = write_config(tmp_path / "c.yaml", None)
    state = build_umg41m(str(cfg), str(sample_raw), str(tmp_path / "out"), return_state=True)
    assert state.is_completed() and not ray.is_initialized()
    assert state.result()["announced"]
    _assert_every_input_once(sample_raw, tmp_path / "out")
    again = build_umg41m(str(cfg), str(sample_raw), str(tmp_path / "out"), return_state=True)  # nothing left
    assert again.is_completed()
    assert again.result()["skipped"] == 4 and again.result()["written"] == 0
    assert not again.result()["announced"]
    assert _events(_run_id(state), wait_s=20), "the first, completing run announces"
    assert _events(_run_id(again), wait_s=3) == [], "a rerun of a finished build started training again"


def test_a_systematic_stage_failure_leaves_shards_unfinished_and_retry_errors_rebuilds_error_rows(
        prefect_server, sample_raw, tmp_path):
    broken = tmp_path / "gpu-broken"
    broken.touch()
    cfg = write_config(tmp_path / "c.yaml", {"tagger": {"backend": "test-tagger", "broken_marker": str(broken)}},
                       flow={"shard_retries": 0}, breaker={"max_stage_failure": 0.5, "min_inputs": 2})
    out = tmp_path / "out"
    state = build_umg41m(str(cfg), str(sample_raw), str(out), return_state=True)
    assert state.is_failed() and "incomplete" in state.message
    assert finished_shards(out) == []  # not committed full of error rows: a rerun builds them
    assert _events(_run_id(state), wait_s=3) == []

    # the breaker off: the old behaviour commits the error rows; --retry-errors rebuilds them once fixed
    cfg = write_config(tmp_path / "c.yaml", {"tagger": {"backend": "test-tagger", "broken_marker": str(broken)}},
                       flow={"shard_retries": 0}, breaker={"max_stage_failure": 1.0})
    assert build_umg41m(str(cfg), str(sample_raw), str(out))["written"] == 4
    assert {row["error"].split(":")[0] for row in _rows(out)} == {"annotator_failed"}
    broken.unlink()
    summary = build_umg41m(str(cfg), str(sample_raw), str(out), retry_errors=True)
    assert summary["repaired"] == 4 and summary["written"] == 0
    rows = _assert_every_input_once(sample_raw, out)
    assert all(row["status"] == "ok" for row in rows)
