"""Size the annotation actor pools from measured per-stage costs: ``ray.resources`` that keep every GPU busy.

The cost of a stage is the GPU-seconds one image takes on one whole GPU (``benchmarks/stage_throughput.py``
measures them; ``configs/costs/`` holds estimates, labelled as such, where no GPU was lent). A GPU is cut into
``slots_per_gpu`` equal slots; every stage gets whole slots, and an actor of a stage with ``num_gpus = f`` is
modelled as running at ``f`` of a GPU's speed (co-located actors time-share the GPU). Then a stage with ``n``
slots processes ``n / slots_per_gpu / cost`` images/s, the chain runs at the rate of its slowest stage, and the
ideal is ``gpus / sum(costs)`` (every GPU-second spent on model work).

:func:`plan_resources` hands slots out greedily to the current bottleneck, which maximises the slowest stage's
rate for whole slots (each step raises the minimum as much as one grant can). Actor sizes are divisors of
``slots_per_gpu`` (a power of two), so the actors of all pools pack onto the GPUs without gaps, and no actor
exceeds one GPU. A stage's ``min_gpus`` (its model's memory share of one GPU) is the smallest actor it gets.
Pure functions; nothing here imports Ray.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_schemas.config import BuildConfig, RayConfig


@dataclass(frozen=True)
class StageCost:
    """One pool's cost: ``seconds_per_image`` GPU-seconds on one whole GPU; ``min_gpus`` the smallest GPU
    fraction one actor may hold (model + activations in memory); ``basis`` where the figure comes from."""

    seconds_per_image: float
    min_gpus: float = 0.0
    basis: str = ""

    def __post_init__(self) -> None:
        if not (self.seconds_per_image >= 0 and math.isfinite(self.seconds_per_image)):
            raise ValueError(f"seconds_per_image must be a finite number >= 0, got {self.seconds_per_image}")
        if not 0.0 <= self.min_gpus <= 1.0:
            raise ValueError(f"min_gpus must be in [0, 1] (actors hold at most one GPU), got {self.min_gpus}")


@dataclass(frozen=True)
class CostTable:
    """Per-pool costs read from a costs file; ``measured`` False means estimates (``note`` says on what)."""

    stages: dict[str, StageCost]
    measured: bool
    note: str = ""


def load_costs(path: str | Path) -> CostTable:
    """Read a costs JSON file: ``{"measured": bool, "note": str, "stages": {pool: {"seconds_per_image": s,
    "min_gpus": f, "basis": str}}}``.

    Raises:
        ValueError: the file is not valid JSON or a field is missing / of the wrong kind (named in the message).
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"costs file {path}: cannot read it: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict) or "measured" not in data:
        raise ValueError(f"costs file {path}: needs 'measured' (true/false) and 'stages' {{pool: {{...}}}}")
    stages = {}
    for name, entry in data["stages"].items():
        try:
            stages[name] = StageCost(float(entry["seconds_per_image"]), float(entry.get("min_gpus", 0.0)),
                                     str(entry.get("basis", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"costs file {path}: stages.{name}: {exc}") from exc
    return CostTable(stages, bool(data["measured"]), str(data.get("note", "")))


@dataclass(frozen=True)
class PoolPlan:
    """One pool: ``slots`` of ``1 / slots_per_gpu`` GPU, cut into actors of ``actor_slots`` each."""

    stage: str
    cost: float
    slots: int
    actor_slots: int
    slots_per_gpu: int

    @property
    def pool_size(self) -> int:
        return self.slots // self.actor_slots

    @property
    def num_gpus(self) -> float:
        return self.actor_slots / self.slots_per_gpu

    @property
    def gpus(self) -> float:
        return self.slots / self.slots_per_gpu

    @property
    def images_per_s(self) -> float:
        return math.inf if self.cost == 0 else self.gpus / self.cost


@dataclass(frozen=True)
class ResourcePlan:
    pools: dict[str, PoolPlan]
    gpus: int
    slots_per_gpu: int

    @property
    def throughput(self) -> float:
        """Images/s of the chain: the rate of its slowest pool."""
        return min(pool.images_per_s for pool in self.pools.values())

    @property
    def ideal(self) -> float:
        """Images/s if every GPU-second went to model work: ``gpus / sum(costs)``."""
        total = sum(pool.cost for pool in self.pools.values())
        return math.inf if total == 0 else self.gpus / total

    @property
    def bottleneck(self) -> str:
        return min(self.pools.values(), key=lambda pool: pool.images_per_s).stage

    @property
    def gpus_used(self) -> float:
        return sum(pool.gpus for pool in self.pools.values())


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _min_actor_slots(cost: StageCost, slots_per_gpu: int) -> int:
    """The smallest divisor of ``slots_per_gpu`` whose GPU fraction holds ``cost.min_gpus``."""
    return next(d for d in _divisors(slots_per_gpu) if d / slots_per_gpu >= cost.min_gpus - 1e-9)


def plan_resources(costs: Mapping[str, StageCost], gpus: int, slots_per_gpu: int = 8) -> ResourcePlan:
    """GPU slots per pool maximising the slowest pool's images/s on ``gpus`` GPUs.

    Every pool starts with its smallest actor; then the pool with the lowest images/s gets one more actor's
    worth of slots while they last (a pool whose cost is 0 is never the bottleneck). Each pool's slots are then
    cut into the fewest actors whose size divides ``slots_per_gpu``.

    Raises:
        ValueError: ``slots_per_gpu`` is not a power of two, no GPUs or no pools, or the GPUs cannot hold one
            actor of every pool.
    """
    if slots_per_gpu < 1 or slots_per_gpu & (slots_per_gpu - 1):
        raise ValueError(f"slots_per_gpu must be a power of two (actors then pack without gaps), got {slots_per_gpu}")
    if gpus < 1 or not costs:
        raise ValueError(f"need at least one GPU and one pool, got {gpus} GPUs and {len(costs)} pools")
    step = {stage: _min_actor_slots(cost, slots_per_gpu) for stage, cost in costs.items()}
    slots = dict(step)
    free = gpus * slots_per_gpu - sum(slots.values())
    if free < 0:
        raise ValueError(f"{gpus} GPUs ({gpus * slots_per_gpu} slots of 1/{slots_per_gpu}) cannot hold one actor "
                         f"of each of {len(costs)} pools (they need {sum(step.values())} slots): add GPUs or "
                         f"raise slots_per_gpu")

    def rate(stage: str) -> float:
        cost = costs[stage].seconds_per_image
        return math.inf if cost == 0 else slots[stage] / cost

    while True:
        slowest = min(costs, key=rate)
        if rate(slowest) == math.inf or step[slowest] > free:
            break  # more slots elsewhere cannot raise the slowest pool's rate
        slots[slowest] += step[slowest]
        free -= step[slowest]
    pools = {}
    for stage, cost in costs.items():
        actor = max(d for d in _divisors(slots_per_gpu) if d % step[stage] == 0 and slots[stage] % d == 0)
        pools[stage] = PoolPlan(stage, cost.seconds_per_image, slots[stage], actor, slots_per_gpu)
    return ResourcePlan(pools, gpus, slots_per_gpu)


def in_flight_batches(plan: ResourcePlan, chunk_sizes: Mapping[str, int], batch_size: int,
                      headroom: float = 2.0) -> int:
    """Batches a chain must keep in flight so every actor can be busy at once.

    A batch of ``B`` images reaches a pool of ``p`` actors as ``k = ceil(B / b)`` chunks of ``b`` images and
    stays ``ceil(k / p)`` chunk-times there. By Little's law a pool running at the plan's rate then holds
    ``p * b * ceil(k / p) / B`` batches; the chain needs the sum over its pools, times ``headroom`` so that
    batches queueing before a busy pool do not starve the next one.
    """
    held = 0.0
    for stage, pool in plan.pools.items():
        chunk = min(chunk_sizes[stage], batch_size)
        held += pool.pool_size * chunk * math.ceil(math.ceil(batch_size / chunk) / pool.pool_size) / batch_size
    return max(1, math.ceil(held * headroom))


def ray_section(plan: ResourcePlan, ray_cfg: RayConfig, kinds: Mapping[str, str], concurrent_shards: int = 1,
                cpus: float | None = None) -> dict[str, Any]:
    """The planned ``ray`` settings: ``max_in_flight`` (per shard) and ``resources`` per pool name.

    Each pool keeps what ``ray_cfg`` gave it (``batch_size``, ``runtime_env``, ``num_cpus``) and gets the plan's
    ``pool_size`` / ``num_gpus``. With ``cpus`` (the CPUs of the whole cluster the actors may take), each actor's
    ``num_cpus`` is capped at its share ``cpus * num_gpus / gpus``. ``kinds``: pool name -> annotator kind.
    """
    resources: dict[str, dict[str, Any]] = {}
    for stage, pool in plan.pools.items():
        base = ray_cfg.resources_for(stage, kinds[stage])
        num_cpus = base.num_cpus
        if cpus is not None:
            num_cpus = min(num_cpus, math.floor(cpus * pool.num_gpus / plan.gpus * 20) / 20)
        entry: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": pool.num_gpus, "pool_size": pool.pool_size,
                                 "batch_size": base.batch_size}
        if base.runtime_env:
            entry["runtime_env"] = dict(base.runtime_env)
        resources[stage] = entry
    chunks = {stage: entry["batch_size"] for stage, entry in resources.items()}
    batches = in_flight_batches(plan, chunks, ray_cfg.batch_size)
    return {"max_in_flight": max(1, math.ceil(batches / concurrent_shards)), "resources": resources}


def describe(plan: ResourcePlan, table: CostTable | None = None) -> list[str]:
    """Plain-text lines: one per pool (GPUs, actors, images/s) and the plan's throughput against the ideal."""
    lines = [f"{'pool':28s} {'s/image':>9s} {'GPUs':>6s} {'actors':>9s} {'images/s':>9s}"]
    for stage, pool in sorted(plan.pools.items(), key=lambda kv: -kv[1].gpus):
        lines.append(f"{stage:28s} {pool.cost:9.4f} {pool.gpus:6.3f} {pool.pool_size:3d} x {pool.num_gpus:<5.3g}"
                     f"{pool.images_per_s:9.2f}")
    kind = "" if table is None else (" (measured costs)" if table.measured else " (ESTIMATED costs)")
    lines.append(f"bottleneck {plan.bottleneck}; {plan.throughput:.2f} images/s on {plan.gpus} GPUs = "
                 f"{plan.throughput / plan.ideal:.3f} of the ideal {plan.ideal:.2f}{kind}")
    return lines


def plan_for_config(cfg: BuildConfig, table: CostTable, gpus: int, slots_per_gpu: int = 8,
                    cpus: float | None = None) -> tuple[ResourcePlan, dict[str, Any]]:
    """Plan the pools of ``cfg``'s model stages from ``table``; returns the plan and its ``ray`` section.

    Raises:
        ValueError: ``cfg`` has no model stages or runs ``ray.mode: chain``, or the costs name a pool the config
            lacks or miss one it has (both listed).
    """
    if cfg.annotate is None or not cfg.annotate.model_stages():
        raise ValueError("the config has no model stages to plan (annotate is empty)")
    if cfg.ray.mode != "stages":
        raise ValueError(f"ray.mode is {cfg.ray.mode!r}: plans are for one pool per stage (ray.mode: stages)")
    kinds = {stage: kind for stage, (kind, _) in cfg.annotate.model_stages().items()}
    missing, unknown = sorted(set(kinds) - set(table.stages)), sorted(set(table.stages) - set(kinds))
    if missing or unknown:
        raise ValueError(f"the costs do not match the config's pools {sorted(kinds)}: "
                         f"missing {missing or 'none'}, not in the config {unknown or 'none'}")
    plan = plan_resources({stage: table.stages[stage] for stage in kinds}, gpus, slots_per_gpu)
    return plan, ray_section(plan, cfg.ray, kinds, cfg.flow.concurrent_shards, cpus)
