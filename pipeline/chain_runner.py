"""Run the stage chain over a shard in batches, several batches in flight, and measure what it did.

``PipelinedChain`` streams a shard through a ``Chain`` in batches of ``batch_size`` on ``max_in_flight``
threads: when the annotators are Ray actor pools (``pipeline.ray_pool``), batch 2 is in the tagger pool
while batch 1 is in the detector pool; the bounded thread count bounds memory. ``ChainMetrics`` records
per-stage seconds and the filters' pass counts (caption score, box threshold + NMS, mask stability) for
the build's reports. Nothing here imports Ray or Prefect; the stage chain (torch) is imported on use.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import annotators

if TYPE_CHECKING:
    from pipeline.ingest import IngestedItem
    from pipeline.stages import Chain, Stage


@dataclass
class ChainMetrics:
    """What a shard's pass through the chain did: per-stage seconds and the filters' pass counts."""

    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_failed: dict[str, int] = field(default_factory=dict)
    captions_scored: int = 0
    captions_kept: int = 0
    boxes_detected: int = 0
    boxes_kept: int = 0
    masks_segmented: int = 0
    masks_kept: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: float) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def add_stage(self, stage: str, seconds: float, failed: int) -> None:
        with self._lock:
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds
            self.stage_failed[stage] = self.stage_failed.get(stage, 0) + failed

    def as_dict(self) -> dict[str, Any]:
        return {name: value for name, value in self.__dict__.items() if name != "_lock"}

    def merge(self, counts: dict[str, Any]) -> None:
        """Add ``as_dict()`` of another run (e.g. from a chain actor)."""
        for stage, seconds in counts.get("stage_seconds", {}).items():
            self.add_stage(stage, seconds, counts.get("stage_failed", {}).get(stage, 0))
        self.add(**{k: v for k, v in counts.items() if k not in ("stage_seconds", "stage_failed")})

    def pass_rates(self) -> dict[str, float | None]:
        def rate(kept: int, total: int) -> float | None:
            return round(kept / total, 4) if total else None

        return {"caption_pass": rate(self.captions_kept, self.captions_scored),
                "box_pass": rate(self.boxes_kept, self.boxes_detected),
                "mask_pass": rate(self.masks_kept, self.masks_segmented)}


def _n_masks(items: Sequence[IngestedItem]) -> int:
    return sum(r.mask is not None for it in items if it.error is None for r in it.record.regions)


def run_stage_measured(stage: Stage, items: Sequence[IngestedItem], metrics: ChainMetrics) -> None:
    """``run_stage`` plus the counts around the filters (merge, caption score, mask stability)."""
    from pipeline.stages import MergeStage, ScoreStage, StabilityStage, run_stage

    live = [it for it in items if it.error is None]
    started = time.perf_counter()
    if isinstance(stage, MergeStage):
        before = sum(len(d.boxes) for it in live for d in it.scratch.get("detections", []))
        regions = sum(len(it.record.regions) for it in live)
        run_stage(stage, items)
        metrics.add(boxes_detected=before,
                    boxes_kept=sum(len(it.record.regions) for it in live if it.error is None) - regions)
    elif isinstance(stage, ScoreStage):
        run_stage(stage, items)
        scored = [c for it in live if it.error is None for c in it.record.captions if c.clip_score is not None]
        metrics.add(captions_scored=len(scored), captions_kept=sum(c.kept for c in scored))
    elif isinstance(stage, StabilityStage):
        segmented = sum(len(it.scratch.get("segmented", ([], None))[0]) for it in live)
        before = _n_masks(live)
        run_stage(stage, items)
        metrics.add(masks_segmented=segmented, masks_kept=_n_masks(live) - (before - segmented))
    else:
        run_stage(stage, items)
    metrics.add_stage(stage.name, time.perf_counter() - started, sum(it.error is not None for it in live))


def run_chain_measured(chain: Chain, items: list[IngestedItem], metrics: ChainMetrics,
                       stop: threading.Event | None = None) -> None:
    """``chain(items)`` stage by stage with metrics; returns early once ``stop`` is set."""
    from pipeline.stages import Chain

    Chain([], keep_known=chain.keep_known)(items)  # the chain's known-annotation policy, no stages
    for stage in chain.stages:
        if stop is not None and stop.is_set():
            return
        run_stage_measured(stage, items, metrics)


class PipelinedChain:
    """Run a ``Chain`` over a shard in batches, ``max_in_flight`` batches at once (one thread each).

    ``pools``: what ``close()`` closes with the chain (the Ray actor pools behind its annotators).
    """

    def __init__(self, chain: Chain, batch_size: int = 16, max_in_flight: int = 4, pools: Sequence[Any] = ()) -> None:
        self.chain, self.batch_size, self.max_in_flight = chain, batch_size, max_in_flight
        self.pools = list(pools)

    def run(self, items: list[IngestedItem], metrics: ChainMetrics | None = None) -> list[IngestedItem]:
        """Annotate ``items`` in place (same order); re-raises ``WorkerLost`` after the other batches end."""
        metrics = metrics if metrics is not None else ChainMetrics()
        batches = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        stop = threading.Event()  # set by the first failing batch: the others stop at their next stage
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_in_flight, len(batches))),
                                thread_name_prefix="chain") as pool:
            futures = [pool.submit(self._run_batch, batch, metrics, stop) for batch in batches]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise next((e for e in errors if isinstance(e, annotators.WorkerLost)), errors[0])
        return items

    __call__ = run

    def _run_batch(self, batch: list[IngestedItem], metrics: ChainMetrics, stop: threading.Event) -> None:
        try:
            run_chain_measured(self.chain, batch, metrics, stop)
        except BaseException:
            stop.set()
            raise

    def heal(self) -> int:
        """Replace pool actors that died serving calls from elsewhere (shard tasks); returns how many."""
        return sum(pool.heal() for pool in self.pools)

    def recycle(self, stage: str | None = None) -> int:
        """Replace every actor of ``stage``'s pool (all pools when no pool is named so), e.g. after the breaker
        tripped on it; returns how many."""
        pools = [pool for pool in self.pools if getattr(pool, "label", None) == stage] or self.pools
        return sum(pool.recycle() for pool in pools)

    def close(self) -> None:
        for pool in self.pools:
            pool.close()
