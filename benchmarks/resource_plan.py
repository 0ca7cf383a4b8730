"""Planned pool layout vs today's static one, simulated on Ray logical GPUs with fake backends of given costs.

``ray.init(num_gpus=8)`` gives Ray 8 logical GPUs (no device is touched). Each stage is a real ``ActorPool``
(``pipeline.ray_pool``) of a fake backend that sleeps ``cost x unit / num_gpus`` seconds per image: an actor
holding a fraction ``f`` of a GPU runs at ``f`` of its speed, as co-located actors time-sharing one GPU would
(the planner's model, ``pipeline.resource_plan``). A ``PipelinedChain`` streams the images through the stages
with its batches in flight, as a build's shard does. Both layouts run in this process, one after the other:

- static: the layout ``configs/umg41m.yaml`` shipped before ``umg plan-resources`` (one actor per stage, 8 batches
  in flight; the
  captioners 1 GPU each, the light stages a quarter or half);
- planned: ``plan_resources(costs, gpus)`` and its ``max_in_flight``.

Printed per layout: images/s in the steady state (between the 25th and 75th percentile of the images' finish
times: a build streams thousands of shards, so a run's ramp-up and drain are not the layout's) and end to end,
their fraction of the ideal (GPUs over the total GPU-seconds per image: every GPU-second spent on model work),
and each pool's busy fraction in the steady state (sleep seconds / (actors x window)). The last line is the
planned layout's steady-state fraction of the ideal (goal >= 0.85, with its bottleneck pool >= 90 % busy).

    .venv/bin/python benchmarks/resource_plan.py [--costs 1,1,2,0.5,12] [--gpus 8] [--unit-ms 20] [--n 600]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray_runtime  # noqa: E402
from data_schemas.config import StageResources  # noqa: E402
from pipeline.chain_runner import PipelinedChain  # noqa: E402
from pipeline.ingest import IngestedItem  # noqa: E402
from pipeline.resource_plan import StageCost, in_flight_batches, plan_resources  # noqa: E402
from pipeline.stages import Chain, Stage  # noqa: E402

#: The example stages, in chain order, with today's static share of one GPU per actor (configs/umg41m.yaml before
#: plan-resources: the region captioner, ~75 % of the work, got one GPU like every captioner).
STAGES = ("tagger", "detector", "captioner", "scorer", "region_captioner")
STATIC_GPUS = {"tagger": 0.25, "detector": 0.5, "captioner": 1.0, "scorer": 0.25, "region_captioner": 1.0}
CHUNK = 4  # images per actor call, every pool


class SleepBackend:
    """A model stand-in: ``seconds_per_image / gpu_fraction`` of sleep per image; returns the call's (start, end)
    wall-clock times for each image."""

    name, version = "sleep", "1"

    def __init__(self, seconds_per_image: float, gpu_fraction: float) -> None:
        self.per_image = seconds_per_image / gpu_fraction

    @classmethod
    def from_config(cls, cfg: dict) -> SleepBackend:
        return cls(cfg["seconds_per_image"], cfg["gpu_fraction"])

    def load(self) -> None:
        pass

    def __call__(self, images: list) -> list[tuple[float, float]]:
        started = time.time()
        time.sleep(self.per_image * len(images))
        return [(started, time.time())] * len(images)


class BusyStage(Stage):
    """Collects the (start, end) of every actor call into ``calls[stage name]``, and each image's finish time
    into ``done`` (the last stage's call end)."""

    def __init__(self, name: str, annotator, calls: dict[str, set], done: list[float]) -> None:
        super().__init__(name, annotator)
        self.calls, self.done = calls, done

    def apply(self, item, output):
        self.calls[self.name].add(output)
        if self.name == STAGES[-1]:
            self.done.append(output[1])


def busy_fraction(calls: set[tuple[float, float]], actors: int, start: float, end: float) -> float:
    """Share of ``actors x (end - start)`` the calls' intervals cover inside the window."""
    covered = sum(max(0.0, min(e, end) - max(s, start)) for s, e in calls)
    return covered / (actors * (end - start))


def run_layout(costs: dict[str, float], layout: dict[str, tuple[int, float]], unit_s: float, n: int,
               max_in_flight: int, batch_size: int) -> dict[str, object]:
    """Stream ``n`` images through pools of ``layout`` (stage -> (actors, num_gpus)).

    Returns images/s end to end (ramp-up and drain included) and in the steady state (between the 25th and the
    75th percentile of finish times), and each pool's busy fraction in that window.
    """
    from pipeline.ray_pool import ActorPool, RemoteAnnotator

    calls: dict[str, set] = defaultdict(set)
    done: list[float] = []
    pools, stages = [], []
    for stage in STAGES:
        actors, gpus = layout[stage]
        resources = StageResources(num_cpus=0, num_gpus=gpus, pool_size=actors, batch_size=CHUNK)
        cfg = {"seconds_per_image": costs[stage] * unit_s, "gpu_fraction": gpus}
        pools.append(ActorPool(stage, SleepBackend, cfg, resources, start_timeout_s=600))
        stages.append(BusyStage(stage, RemoteAnnotator(pools[-1]), calls, done))
    chain = PipelinedChain(Chain(stages, keep_known=True), batch_size, max_in_flight, pools)
    try:
        for pool in pools:
            pool.wait_ready()
        items = [_item(i) for i in range(n)]
        started = time.perf_counter()
        chain.run(items)
        wall = time.perf_counter() - started
    finally:
        chain.close()
    assert all(item.error is None for item in items), [item.error for item in items if item.error][:3]
    done.sort()
    lo, hi = done[n // 4], done[(3 * n) // 4]
    return {"end_to_end": n / wall, "steady": (3 * n // 4 - n // 4) / (hi - lo),
            "busy": {stage: busy_fraction(calls[stage], layout[stage][0], lo, hi) for stage in STAGES}}


def _item(i: int) -> IngestedItem:
    from data_schemas import ImageRecord
    from pipeline.images import DecodedImage
    from PIL import Image

    image = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    record = ImageRecord(key=f"k{i}", source="sim", source_id=str(i), width=8, height=8, sha256="0" * 64)
    return IngestedItem(DecodedImage(image, 8, 8, b"", 1, (8, 8)), record, [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--costs", default="1,1,2,0.5,12", help=f"GPU cost per image of {', '.join(STAGES)}")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--slots-per-gpu", type=int, default=8)
    parser.add_argument("--unit-ms", type=float, default=20.0, help="seconds per image of cost 1 on a whole GPU")
    parser.add_argument("--n", type=int, default=1200, help="images through the planned layout")
    parser.add_argument("--n-static", type=int, default=160, help="images through the static layout (slower)")
    parser.add_argument("--batch-size", type=int, default=16, help="ray.batch_size: images per chain batch")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    costs = dict(zip(STAGES, (float(c) for c in args.costs.split(",")), strict=True))
    unit_s = args.unit_ms / 1000
    ideal = args.gpus / (sum(costs.values()) * unit_s)
    plan = plan_resources({s: StageCost(c) for s, c in costs.items()}, args.gpus, args.slots_per_gpu)
    planned = {s: (p.pool_size, p.num_gpus) for s, p in plan.pools.items()}
    static = {s: (1, g) for s, g in STATIC_GPUS.items()}
    in_flight = in_flight_batches(plan, dict.fromkeys(STAGES, CHUNK), args.batch_size)
    print(f"costs {costs} x {args.unit_ms:g} ms on {args.gpus} logical GPUs: ideal {ideal:.2f} images/s")
    with tempfile.TemporaryDirectory(prefix="umg-plan-bench-") as tmp:
        ray_runtime.start_ray(None, num_cpus=2, num_gpus=args.gpus, _temp_dir=tmp, log_to_driver=False)
        import ray

        try:
            results = {}
            for name, layout, n, flight in (("static", static, args.n_static, 8),
                                            ("planned", planned, args.n, in_flight)):
                results[name] = got = run_layout(costs, layout, unit_s, n, flight, args.batch_size)
                shape = ", ".join(f"{s} {a}x{g:g}" for s, (a, g) in layout.items())
                print(f"{name:8s} [{shape}] max_in_flight {flight}, {n} images: steady state {got['steady']:.2f} "
                      f"images/s = {got['steady'] / ideal:.3f} of ideal (end to end incl. ramp-up and drain "
                      f"{got['end_to_end']:.2f} = {got['end_to_end'] / ideal:.3f}); busy in the steady state: "
                      + ", ".join(f"{s} {b:.0%}" for s, b in got["busy"].items()))
            print(f"planned bottleneck {plan.bottleneck}: {results['planned']['busy'][plan.bottleneck]:.1%} busy "
                  f"(the plan predicts {plan.throughput / unit_s:.2f} images/s = {plan.throughput / plan.ideal:.3f} "
                  f"of ideal)")
        finally:
            ray.shutdown()
    print(f"planned / static steady-state throughput: {results['planned']['steady'] / results['static']['steady']:.2f}x")
    print(f"planned layout: steady-state fraction of ideal {results['planned']['steady'] / ideal:.3f} (goal >= 0.85)")


if __name__ == "__main__":
    main()
