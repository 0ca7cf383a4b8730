"""GPU-hours and wall clock of a UMG-41M build from a costs file (docs/scale.md's capacity plan).

Reads per-pool GPU-seconds per image (``configs/costs/umg41m_estimates.json``: estimates, labelled; or a measured
file from ``benchmarks/stage_throughput.py --costs-out``), prints each pool's GPU-hours for ``--images`` and its
share, then for each cluster size the planned layout (``pipeline.resource_plan.plan_resources``), its throughput,
fraction of the ideal, wall clock and the GPU-hours the nodes are held. Also the layout ``configs/umg41m.yaml``
shipped before the planner (one node), under the same costs. Last line: the GPU-hours of the planned 8-node build.

    .venv/bin/python benchmarks/capacity_plan.py [--costs FILE] [--images 41.41e6] [--nodes 1 8 32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.resource_plan import load_costs, plan_resources  # noqa: E402

#: configs/umg41m.yaml's ray.resources before `umg plan-resources` (GPUs per pool: num_gpus x pool_size)
STATIC_GPUS = {"tagger": 0.25, "captioner_blip2": 2.0, "captioner_vlm": 1.0, "scorer": 0.25, "detector_bigdet": 0.5,
               "detector_v3det": 0.5, "region_captioner_vlm": 1.0, "region_captioner_gpt4roi": 1.0, "segmenter": 0.5,
               "background": 0.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--costs", default=str(ROOT / "configs" / "costs" / "umg41m_estimates.json"))
    parser.add_argument("--images", type=float, default=41.41e6)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    table = load_costs(args.costs)
    costs = {stage: cost.seconds_per_image for stage, cost in table.stages.items()}
    total = sum(costs.values())
    print(f"costs: {'measured' if table.measured else 'ESTIMATES'} ({Path(args.costs).name}); "
          f"{args.images / 1e6:.2f}M images")
    print("| pool | GPU-s per image | GPU-hours | share |")
    print("|---|---|---|---|")
    for stage, cost in sorted(costs.items(), key=lambda kv: -kv[1]):
        print(f"| {stage} | {cost:.4f} | {cost * args.images / 3600:,.0f} | {cost / total:.1%} |")
    ideal_hours = total * args.images / 3600
    print(f"| **total (every GPU busy)** | {total:.4f} | **{ideal_hours:,.0f}** | |")
    static_rate = min(STATIC_GPUS[stage] / cost for stage, cost in costs.items() if cost > 0)
    static_gpus = args.gpus_per_node
    print(f"static layout (before the planner), 1 node: {static_rate:.3f} images/s = "
          f"{static_rate * total / static_gpus:.3f} of ideal; "
          f"{args.images / static_rate / 3600 * static_gpus:,.0f} GPU-hours held, "
          f"{args.images / static_rate / 86400:,.0f} days")
    hours = {}
    for nodes in args.nodes:
        gpus = nodes * args.gpus_per_node
        plan = plan_resources(table.stages, gpus)
        hours[nodes] = args.images / plan.throughput / 3600 * gpus
        big = sorted(plan.pools.values(), key=lambda p: -p.gpus)[:3]
        print(f"planned, {nodes} node(s) = {gpus} GPUs: {plan.throughput:.2f} images/s = "
              f"{plan.throughput / plan.ideal:.3f} of ideal; bottleneck {plan.bottleneck}; "
              f"{hours[nodes]:,.0f} GPU-hours held, {args.images / plan.throughput / 86400:.1f} days; largest pools "
              + ", ".join(f"{p.stage} {p.pool_size} x {p.num_gpus:g}" for p in big))
    last = 8 if 8 in hours else args.nodes[-1]
    print(f"GPU-hours of the planned {last}-node build: {hours[last]:,.0f}")


if __name__ == "__main__":
    main()
