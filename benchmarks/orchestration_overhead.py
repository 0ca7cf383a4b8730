"""Orchestration overhead: the Prefect flow + Ray actor pools against a plain in-process loop.

Both sides annotate the same sample images (digit scenes, seed 0) with the same config (default
``configs/smoke.yaml``: tiny real backends) into fresh build directories:

- loop: ``prepare_chain`` (load every backend in this process) + ``build_shards`` — what ``umg build`` does,
  once with torch's default threads and once with one intra-op thread (faster for tiny models on 2 cores);
- flow: ``build-umg41m`` called in this process against a local Prefect server (started before timing,
  not counted), which starts a local Ray, one actor pool per annotator, one task per shard.

Timed from the call to the finished build, model loading / actor start-up included. Also printed: the
time spent in the shards themselves (``ShardStats.seconds`` summed), i.e. the steady state without
start-up. The figure printed last is the end-to-end throughput ratio of the faster flow mode over the faster
loop (goal >= 0.9).

    .venv/bin/python benchmarks/orchestration_overhead.py [--n 128] [--shard-size 16] [--config FILE]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_schemas import load_config  # noqa: E402
from flows import services  # noqa: E402
from pipeline.sample_data import generate_sample  # noqa: E402
from pipeline.shard_build import build_shards  # noqa: E402
from pipeline.shards import finished_shards, read_stats  # noqa: E402
from pipeline.sources.registry import build_source  # noqa: E402
from pipeline.tiny_models import prepare_chain  # noqa: E402
from pipeline.validate import validate_build  # noqa: E402


def shard_seconds(build_dir: Path) -> float:
    return sum(read_stats(build_dir, name).seconds for name in finished_shards(build_dir))


def run_loop(config: str, raw: Path, out: Path, shard_size: int, threads: int | None = None) -> float:
    """``umg build``'s engine; ``threads`` sets torch's intra-op threads for this run (None: torch default)."""
    import torch

    default = torch.get_num_threads()
    torch.set_num_threads(threads or default)
    try:
        started = time.perf_counter()
        cfg = load_config(config, [f"source.path={raw}", f"shard_size={shard_size}"])
        chain = prepare_chain(cfg.annotate)
        build_shards(build_source(cfg.source), out, cfg.shard_size, cfg.images, annotate=chain)
        return time.perf_counter() - started
    finally:
        torch.set_num_threads(default)


def run_flows(config: str, raw: Path, work: Path, shard_size: int, modes: dict[str, list[str]]) -> dict[str, float]:
    """Seconds per mode of ``build-umg41m`` (one local Prefect server for all, started before timing)."""
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    server = services.start_server(work / "prefect", log=work / "server.log")
    seconds = {}
    try:
        services.wait_healthy(server.url, pid=server.pid)
        with temporary_settings(updates={PREFECT_API_URL: server.url, PREFECT_HOME: str(work / "prefect")}):
            from flows.build import build_umg41m

            for mode, overrides in modes.items():
                started = time.perf_counter()
                build_umg41m(config, str(raw), str(work / mode), [f"shard_size={shard_size}", *overrides])
                seconds[mode] = time.perf_counter() - started
            APILogWorker.drain_all(timeout=5)
    finally:
        services.stop(server.pid)
    return seconds


#: ray.mode=stages: one actor pool per model stage (the config as is); ray.mode=chain: two actors, each
#: running every stage (one process loads all models).
MODES = {"flow-stages": ["ray.mode=stages"],
         "flow-chain": ["ray.mode=chain", "ray.resources={chain: {pool_size: 2, num_cpus: 1, batch_size: 8}}"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--config", default=str(ROOT / "configs" / "smoke.yaml"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="umg-orch-bench-"))
    try:
        raw = work / "raw"
        generate_sample(raw, n=args.n, seed=0)
        seconds = {"loop": run_loop(args.config, raw, work / "loop", args.shard_size),
                   "loop-1thread": run_loop(args.config, raw, work / "loop-1thread", args.shard_size, threads=1)}
        seconds.update(run_flows(args.config, raw, work, args.shard_size, MODES))
        reports = {name: validate_build(work / name) for name in seconds}
        for name, report in reports.items():
            print(f"{name:12s} {report.inputs} images in {seconds[name]:6.1f} s = "
                  f"{report.inputs / seconds[name]:5.2f} img/s (in shards {shard_seconds(work / name):5.1f} s; "
                  f"ok {report.samples}, regions {report.regions}, masks {report.masks}, captions {report.captions})")
        fields = ("inputs", "samples", "regions", "masks", "captions", "tags", "background")
        same = all(getattr(r, f) == getattr(reports["loop"], f) for r in reports.values() for f in fields)
        print(f"same annotation counts on every side: {same}")
        loops = ("loop", "loop-1thread")
        for mode in MODES:
            for loop in loops:
                print(f"{mode} vs {loop}: steady-state ratio (shard time only) "
                      f"{shard_seconds(work / loop) / shard_seconds(work / mode):.2f}, "
                      f"end-to-end ratio {seconds[loop] / seconds[mode]:.2f}")
        best_flow = min(MODES, key=seconds.__getitem__)
        best_loop = min(loops, key=seconds.__getitem__)
        print(f"throughput ratio flow/loop: {seconds[best_loop] / seconds[best_flow]:.2f} "
              f"({best_flow} vs {best_loop}, end to end incl. start-up, goal >= 0.9)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
