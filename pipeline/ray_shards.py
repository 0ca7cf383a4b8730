"""Shards as Ray tasks: ingest, annotate (through the shared actor pools) and write on any node's CPUs.

With one driver processing shards one after another, the driver decodes every image and becomes the bottleneck
long before the GPUs do. ``ShardRunner.run(shard)`` runs ``pipeline.shard_build.process_shard`` in a Ray task
(``num_cpus`` each) instead; the orchestrator keeps several in flight (``flow.concurrent_shards``). The task
gets the annotation chain pickled — its pools travel as ``PoolClient``s of the same actors (models are loaded
once, in the pools, never per task) — and the build's key ledger as Ray actors (``RemoteKeyLedger``, keys partitioned over
``key_partitions`` actors), so a key is still written once per build. Exactly-once of inputs is unchanged: each
shard publishes its files from its own task, the stats file (its done-marker) last; a task that dies leaves an
unfinished shard that the next run discards and redoes.

Before the first task the pools are shared (``ActorPool.share``): each pool's actor set moves into a keeper actor
the driver owns, so a shard task whose actor dies has it replaced there (one replacement per death, whichever
task saw it first) and bisects a poison input down to one ``worker_lost`` row as the driver would. A failure
inside the task comes back as the original exception (``ShardTripped``, ``WorkerLost`` ...); on ``WorkerLost``
the driver's pools probe and replace dead actors (``heal``), on ``ShardTripped`` every actor of the tripped stage
(``recycle``: a stage failing on an ordinary control image has a broken device or state) before the caller
retries the shard.
Nothing here imports Prefect.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import annotators
from data_schemas import ImageLimits, ShardStats
from data_schemas.config import BreakerConfig
from pipeline.breaker import ShardTripped
from pipeline.chain_runner import ChainMetrics
from pipeline.key_ledger import KeyLedger, RemoteKeyLedger
from pipeline.repair import repair_shard
from pipeline.shard_build import process_shard
from pipeline.sources.base import InputShard, Source


def _shard_task(source: Source, shard: InputShard, build_dir: Path, limits: ImageLimits, keys: Any, chain: Any,
                breaker: BreakerConfig | None, repair: bool) -> tuple[ShardStats, dict[str, Any]]:
    metrics = ChainMetrics()
    annotate = None if chain is None else (lambda items: chain.run(items, metrics=metrics))
    stats = (repair_shard if repair else process_shard)(source, shard, build_dir, limits, keys, annotate, breaker)
    return stats, metrics.as_dict()


def _warm_up() -> int:
    """Import what a shard task needs (the stage chain pulls in torch) once per worker process."""
    import pipeline.stages  # noqa: F401

    return os.getpid()


class ShardRunner:
    """Runs shards of one build, in this process (``remote=False``) or as Ray tasks (``remote=True``).

    ``run`` is thread-safe: call it from several threads to have that many shards in flight. Remote: the key
    ledger actor and ``warm_workers`` tasks (imports in each shard worker) start at once, in parallel with
    whatever the caller does next (loading the model pools); ``wait_warm`` waits for them.
    """

    def __init__(self, source: Source, build_dir: str | Path, limits: ImageLimits, taken_keys: Iterable[Any],
                 chain: Any, breaker: BreakerConfig | None, remote: bool = False, num_cpus: float = 1.0,
                 warm_workers: int = 0, key_partitions: int = 2) -> None:
        self.source, self.build_dir, self.limits, self.chain, self.breaker = source, build_dir, limits, chain, breaker
        self.remote = remote
        self._warming: list[Any] = []
        if remote:
            import ray

            self.keys: Any = RemoteKeyLedger(taken_keys, partitions=key_partitions)
            self._task = ray.remote(_shard_task).options(num_cpus=num_cpus, max_retries=0)  # retries: the caller's
            warm = ray.remote(_warm_up).options(num_cpus=num_cpus)
            self._warming = [warm.remote() for _ in range(warm_workers)] + self.keys.ready()
        else:
            self.keys = KeyLedger(taken_keys)

    def wait_warm(self) -> None:
        """Block until the shard workers have imported the pipeline and the key ledger is up."""
        if self._warming:
            import ray

            ray.get(self._warming)
            self._warming = []

    def run(self, shard: InputShard, metrics: ChainMetrics | None = None, repair: bool = False) -> ShardStats:
        """Build ``shard`` (``repair``: rebuild its retryable error rows, ``pipeline.repair``); its chain metrics
        are added to ``metrics``."""
        metrics = metrics if metrics is not None else ChainMetrics()
        if self.remote:
            self._share_pools()
        args = (self.source, shard, self.build_dir, self.limits, self.keys, self.chain, self.breaker, repair)
        try:
            stats, counts = self._run_remote(shard, args) if self.remote else _shard_task(*args)
        except ShardTripped as exc:  # the stage failed on an ordinary image too: its actors are taken for broken
            if self.chain is not None and hasattr(self.chain, "recycle"):
                self.chain.recycle(exc.stage)
            raise
        metrics.merge(counts)
        return stats

    def _share_pools(self) -> None:
        """Give the chain's pools keepers, so shard tasks can have dead actors replaced (``ActorPool.share`` is
        idempotent: only the first shard moves anything)."""
        for pool in getattr(self.chain, "pools", ()):
            if hasattr(pool, "share"):
                pool.share()

    def _run_remote(self, shard: InputShard, args: tuple) -> tuple[ShardStats, dict[str, Any]]:
        import ray

        ref = self._task.remote(*args)
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, Exception) else exc
            if isinstance(cause, annotators.WorkerLost) and self.chain is not None:
                self.chain.heal()
            raise cause from None
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as exc:
            raise annotators.WorkerLost(f"shard {shard.name}: the shard task's worker died: {exc}") from exc
