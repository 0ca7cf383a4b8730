"""``umg plan-resources``: pool sizes and GPU fractions from per-stage costs (thin; the work is
``pipeline.resource_plan``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml


def plan_resources(
    config: Annotated[Path, typer.Option(help="YAML BuildConfig whose model stages are planned")],
    gpus: Annotated[int, typer.Option(help="GPUs per node")],
    costs: Annotated[Path, typer.Option(help="costs JSON: GPU-seconds per image of each pool (measured by "
                                             "benchmarks/stage_throughput.py --costs-out, or estimates)")],
    nodes: Annotated[int, typer.Option(help="nodes of --gpus GPUs each")] = 1,
    slots_per_gpu: Annotated[int, typer.Option(help="GPU slices an actor may hold (power of two)")] = 8,
    cpus_per_node: Annotated[Optional[float], typer.Option(
        help="CPUs per node the actors may take (caps num_cpus per actor by its GPU share)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="write the ray section (YAML) here instead of stdout")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="config override, e.g. "
                                                      "flow.concurrent_shards=16 (max_in_flight is per shard)")] = None,
) -> None:
    """Write the `ray` section (max_in_flight, resources per pool) that keeps every GPU busy; with --out, prints
    the plan's figures as JSON last."""
    from data_schemas import ConfigError, load_config
    from flows.cli import _fail, console  # here, not at import: flows.cli imports this module
    from pipeline.resource_plan import describe, load_costs, plan_for_config

    if nodes < 1:
        _fail(f"--nodes must be >= 1, got {nodes}")
    try:
        table = load_costs(costs)
        plan, section = plan_for_config(load_config(config, set_), table, gpus * nodes, slots_per_gpu,
                                        None if cpus_per_node is None else cpus_per_node * nodes)
    except (ConfigError, ValueError) as exc:
        _fail(str(exc))
    summary = {"gpus": plan.gpus, "bottleneck": plan.bottleneck, "images_per_s": round(plan.throughput, 4),
               "ideal_images_per_s": round(plan.ideal, 4),
               "fraction_of_ideal": round(plan.throughput / plan.ideal, 4), "costs_measured": table.measured}
    header = [f"# umg plan-resources --gpus {gpus} --nodes {nodes} --slots-per-gpu {slots_per_gpu} "
              f"--costs {costs.name}" + ("" if table.measured else "  (ESTIMATED costs: " + table.note + ")"),
              *(f"# {line}" for line in describe(plan, table))]
    text = "\n".join(header) + "\n" + yaml.safe_dump({"ray": section}, sort_keys=False, width=120)
    for line in describe(plan, table):
        console.print(line, markup=False, highlight=False)
    if out is None:
        typer.echo(text, nl=False)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    typer.echo(json.dumps({"out": str(out), **summary}))
