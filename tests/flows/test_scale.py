"""Simulated scale-out of ``build-umg41m``: 10,000 tiny inputs, a slow fake annotator, local Ray with 1, 2 and 4
CPU workers. With ``flow.concurrent_shards`` > 1 every shard (ingest, annotate through the shared pool, write)
is a Ray task, so shards overlap and throughput grows with the workers up to the cores; ``kill -9`` of the whole
build mid-way and a resume still write every input exactly once. Prints the throughput table (no timing is
asserted: the overlap of shard tasks is)."""

from __future__ import annotations

import io
import os
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers_backends import kill_9_build_when, ray_env, wait_gone, write_config
from PIL import Image

from data_schemas.config import RayConfig
from flows.build import build_umg41m
from flows.services import api
from pipeline.shards import finished_shards, read_shard_rows, stray_pieces

N_INPUTS, SHARD_SIZE = 10_000, 500
N_SHARDS = N_INPUTS // SHARD_SIZE


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory) -> Path:
    """10,000 8x8 PNGs (16 colours), one file each."""
    root = tmp_path_factory.mktemp("tiny")
    variants = []
    for i in range(16):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (16 * i, 255 - 16 * i, 90)).save(buffer, format="PNG")
        variants.append(buffer.getvalue())
    for i in range(N_INPUTS):
        (root / f"img_{i:05d}.png").write_bytes(variants[i % 16])
    return root


@pytest.fixture(scope="module")
def shared_ray():
    """One local Ray (4 CPUs) for the in-process runs: its worker processes import the pipeline once and serve
    every run (a flow joins a running Ray instead of starting one); each run uses ``workers`` of its CPUs."""
    import ray

    from pipeline.ray_pool import start_ray

    if ray.is_initialized():
        ray.shutdown()
    owned = start_ray(RayConfig(num_cpus=4, runtime_env=ray_env()))
    yield ray
    if owned:
        ray.shutdown()


def _config(path: Path, workers: int) -> Path:
    tagger = {"backend": "test-tagger", "delay_per_image_s": 0.0005}  # a slow model: 0.5 ms per image
    return write_config(
        path, {"tagger": tagger}, shard_size=SHARD_SIZE,
        ray={"num_cpus": workers, "batch_size": 125, "max_in_flight": 2,
             "default": {"num_cpus": 0, "pool_size": workers, "batch_size": 125}},
        flow={"concurrent_shards": workers, "shard_num_cpus": 1, "overlays": 0})


def _every_input_once(raw: Path, out: Path) -> None:
    rows = [row for name in finished_shards(out) for row in read_shard_rows(out, name)]
    assert len(finished_shards(out)) == N_SHARDS
    assert Counter(row["source_id"] for row in rows) == Counter(p.name for p in raw.iterdir())
    assert all(row["status"] == "ok" for row in rows)


def _max_overlap(run_id: str) -> int:
    """Most shard task runs of the flow run that were running at the same moment."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with api(None) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    edges = sorted([(r.start_time, 1) for r in runs] + [(r.end_time, -1) for r in runs])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def test_shard_throughput_grows_with_workers_and_kill_9_resume_stays_exactly_once(
        prefect_server, flow_env, tiny_inputs, shared_ray, tmp_path, capsys):
    table = []
    for workers in (1, 2, 4):
        out = tmp_path / f"out{workers}"
        started = time.perf_counter()
        state = build_umg41m(str(_config(tmp_path / f"c{workers}.yaml", workers)), str(tiny_inputs), str(out),
                             return_state=True)
        end_to_end = time.perf_counter() - started
        assert state.is_completed(), state.message
        summary = state.result()
        _every_input_once(tiny_inputs, out)
        overlap = _max_overlap(str(state.state_details.flow_run_id))
        assert overlap == min(workers, N_SHARDS) if workers > 1 else overlap == 1, (workers, overlap)
        table.append((workers, overlap, end_to_end, summary["shards_wall_s"], summary["inputs_per_s"]))

    # kill -9 of a whole build (driver, its own Ray, shard tasks) while 2 shards are in flight, then resume
    cfg, out = _config(tmp_path / "kill.yaml", 2), tmp_path / "killed"
    family = kill_9_build_when(cfg, tiny_inputs, out, lambda: len(finished_shards(out)) >= 3, timeout_s=150)
    wait_gone(family)  # Ray's processes shared the driver's fate; a shard task may commit until it is gone
    killed_at = len(finished_shards(out))
    assert 3 <= killed_at < N_SHARDS and stray_pieces(out) == []
    resumed = build_umg41m(str(cfg), str(tiny_inputs), str(out), return_state=True)
    assert resumed.is_completed(), resumed.message
    assert resumed.result()["skipped"] == killed_at
    _every_input_once(tiny_inputs, out)

    base = table[0][4]
    lines = [f"scale-out: {N_INPUTS} inputs, {N_SHARDS} shards, fake annotator 0.5 ms/image, "
             f"{os.cpu_count()} cores",
             "| workers | shards at once | end to end s | shard phase s | inputs/s | vs 1 worker |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {w} | {o} | {e:.1f} | {s:.1f} | {r:.0f} | {r / base:.2f}x |" for w, o, e, s, r in table]
    lines.append(f"kill -9 after {killed_at} of {N_SHARDS} shards, resume: every input exactly once")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
