"""Ray actor pools for the annotation chain: each backend loaded once per actor, calls fanned out over a pool.

Two layouts (``ray.mode``):

- ``stages`` (default): one pool per model stage. ``build_ray_chain`` builds the usual ``Chain`` and swaps each
  stage's annotator for a ``RemoteAnnotator`` (same ``name`` / ``version``; ``__call__(*batch)`` splits the batch
  into chunks of the stage's ``batch_size`` and sends each to the least-busy actor of its pool). ``Stage`` and
  ``run_stage`` are unchanged, so the chain behaves the same in-process and on Ray; ``PipelinedChain`` keeps
  several batches in flight so different batches occupy different pools at once. Per-stage ``num_gpus``.
- ``chain``: one pool whose actors each hold the whole chain (``ChainBackend``); a shard is cut into chunks that
  run on the actors in parallel. One process loads every model: the fastest start on a small CPU machine.

Failures: an annotator error comes back as the backend's own exception (the stage splits the batch down to
per-image error rows); a dead actor raises ``annotators.WorkerLost`` (the shard fails and is retried by the
orchestrator) and the pool starts a replacement. Nothing here imports Prefect.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import annotators
import ray_runtime
from data_schemas import PIPELINE_VERSION, AnnotateConfig
from data_schemas.config import RayConfig, StageResources
from pipeline.chain_runner import ChainMetrics, PipelinedChain, run_chain_measured

if TYPE_CHECKING:  # the stage chain imports torch: actors of plain backends start faster without it
    from pipeline.ingest import IngestedItem
    from pipeline.stages import Chain

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------- runtime
def start_ray(cfg: RayConfig) -> bool:
    """Connect to a cluster or start a local Ray (loopback only unless ``cfg.loopback`` is False).

    The cluster address is ``cfg.address``, else ``$UMG_RAY_ADDRESS`` / ``$RAY_ADDRESS`` (docker/compose.yaml
    sets the first). Returns True when this call initialised Ray (the caller then owns ``ray.shutdown()``),
    False when this process was already connected. (``ray_runtime.start_ray``, shared with ``model.launch``.)
    """
    return ray_runtime.start_ray(cfg.address, loopback=cfg.loopback, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                                 runtime_env=cfg.runtime_env, ignore_reinit_error=True, log_to_driver=True)


# ----------------------------------------------------------------------------------------------------- actors
class AnnotatorActor:
    """Holds one backend; ``load()`` runs once when the actor starts."""

    def __init__(self, backend_cls: type, cfg: dict[str, Any]) -> None:
        self.backend = backend_cls.from_config(cfg)
        self.backend.load()

    def info(self) -> tuple[str, str, int]:
        return self.backend.name, self.backend.version, os.getpid()

    def call(self, *batch: Sequence[Any]) -> list[Any]:
        return list(self.backend(*batch))


def _lost_errors() -> tuple[type[BaseException], ...]:
    from ray import exceptions as rex

    return (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError, rex.LocalRayletDiedError,
            rex.OutOfMemoryError, rex.ObjectLostError)


class ActorPool:
    """``size`` actors of one backend; ``call`` fans a batch out in chunks, replaces actors that die."""

    def __init__(self, label: str, backend_cls: type, cfg: dict[str, Any], resources: StageResources,
                 start_timeout_s: float = 300.0) -> None:
        import ray

        self.label, self.resources, self.start_timeout_s = label, resources, start_timeout_s
        self._remote = ray.remote(AnnotatorActor)
        self._options = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus}
        self._args = (backend_cls, dict(cfg))
        self._prefix = f"umg-{label}-{uuid.uuid4().hex[:6]}"  # actor names, e.g. for ray.get_actor in tests
        self._spawned = 0
        self._lock = threading.Lock()
        self._busy: dict[Any, int] = {}  # actor handle -> calls in flight
        self.replaced = 0
        for _ in range(resources.pool_size):
            self._busy[self._spawn()] = 0
        self.name, self.version = "", ""

    def _spawn(self):
        self._spawned += 1
        return self._remote.options(name=f"{self._prefix}-{self._spawned}", **self._options).remote(*self._args)

    @property
    def actors(self) -> list[Any]:
        with self._lock:
            return list(self._busy)

    def wait_ready(self) -> None:
        """Block until every actor has loaded its model; raise ``AnnotatorError`` naming a failed load."""
        import ray

        refs = [actor.info.remote() for actor in self.actors]
        try:
            infos = ray.get(refs, timeout=self.start_timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            raise annotators.AnnotatorError(
                f"{self.label}: actors not ready after {self.start_timeout_s:.0f} s; is there room for "
                f"{self.resources.pool_size} x (num_cpus={self.resources.num_cpus}, "
                f"num_gpus={self.resources.num_gpus})? cluster: {ray.cluster_resources()}") from exc
        except ray.exceptions.RayError as exc:
            detail = str(exc).strip().splitlines()[-1]  # the backend's own error, after Ray's traceback
            raise annotators.AnnotatorError(f"{self.label}: the backend failed to load: {detail}") from exc
        self.name, self.version = infos[0][0], infos[0][1]
        log.info("pool %s: %d actors ready (%s@%s, pids %s)", self.label, len(infos), self.name, self.version,
                 [i[2] for i in infos])

    def _acquire(self):
        with self._lock:
            actor = min(self._busy, key=self._busy.__getitem__)
            self._busy[actor] += 1
            return actor

    def _release(self, actor, dead: bool) -> None:
        with self._lock:
            if actor not in self._busy:
                return  # already replaced by another caller
            if dead:
                del self._busy[actor]
                self._busy[self._spawn()] = 0
                self.replaced += 1
                log.warning("pool %s: actor died; started a replacement (%d so far)", self.label, self.replaced)
            else:
                self._busy[actor] -= 1

    def call(self, *batch: Sequence[Any]) -> list[Any]:
        """Run the backend on ``batch`` (per-image argument lists); one output per image, in order."""
        import ray

        n = len(batch[0]) if batch else 0
        step = self.resources.batch_size
        pending = []
        for start in range(0, n, step):
            actor = self._acquire()
            pending.append((actor, actor.call.remote(*(list(arg[start:start + step]) for arg in batch))))
        outputs: list[Any] = []
        failure: BaseException | None = None
        for actor, ref in pending:  # wait for every chunk so no call outlives this one
            try:
                outputs.extend(ray.get(ref))
                self._release(actor, dead=False)
            except _lost_errors() as exc:
                self._release(actor, dead=True)
                failure = failure or annotators.WorkerLost(f"{self.label}: {type(exc).__name__}: {exc}")
            except ray.exceptions.RayTaskError as exc:
                self._release(actor, dead=False)
                cause = exc.cause if isinstance(exc.cause, Exception) else exc
                failure = failure if isinstance(failure, annotators.WorkerLost) else (failure or cause)
        if failure is not None:
            raise failure
        return outputs

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        with self._lock:
            self._busy.clear()


class RemoteAnnotator:
    """Stands in for a backend inside a ``Stage``: the backend's ``name`` / ``version``, calls go to a pool."""

    def __init__(self, pool: ActorPool) -> None:
        self.pool = pool

    @property
    def name(self) -> str:
        return self.pool.name

    @property
    def version(self) -> str:
        return self.pool.version

    def load(self) -> None:
        self.pool.wait_ready()

    def __call__(self, *batch: Sequence[Any]) -> list[Any]:
        return self.pool.call(*batch)


# ------------------------------------------------------------------------------------------------- the chain
def stage_backends(cfg: AnnotateConfig) -> dict[str, tuple[str, dict[str, Any]]]:
    """Stage name -> (annotator kind, backend config), named as ``pipeline.stages.build_chain`` names stages."""
    named = {"tagger": ("tagger", cfg.tagger), "scorer": ("scorer", cfg.scorer),
             "segmenter": ("segmenter", cfg.segmenter), "background": ("background", cfg.background)}
    out = {stage: (kind, backend) for stage, (kind, backend) in named.items() if backend}
    for kind, group in (("captioner", cfg.captioners), ("detector", cfg.detectors),
                        ("region_captioner", cfg.region_captioners)):
        out.update({f"{kind}_{name}": (kind, backend) for name, backend in group.items()})
    return out


def stage_resources(ray_cfg: RayConfig, stage: str, kind: str) -> StageResources:
    """``ray.resources[stage]``, else ``ray.resources[kind]``, else ``ray.default``."""
    return ray_cfg.resources.get(stage) or ray_cfg.resources.get(kind) or ray_cfg.default


class ChainBackend:
    """``ray.mode: chain``: the whole chain as one backend, so one actor process loads every model.

    Called with a chunk of items; returns per item ``(record, error, metrics of the chunk or None)``.
    """

    name = "chain"
    version = PIPELINE_VERSION

    def __init__(self, annotate: dict[str, Any], classes: dict[tuple[str, str], type]) -> None:
        self.annotate = AnnotateConfig.model_validate(annotate)
        for (kind, backend), cls in classes.items():  # backends registered at runtime in the driver, too
            annotators.register(kind, backend, f"{cls.__module__}:{cls.__qualname__}")
        self.chain: Chain | None = None

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ChainBackend:
        return cls(cfg["annotate"], cfg["classes"])

    def load(self) -> None:
        from pipeline.stages import Chain

        self.chain = Chain.from_config(self.annotate)
        self.chain.load()

    def __call__(self, items: list[IngestedItem]) -> list[tuple[Any, str | None, dict | None]]:
        metrics = ChainMetrics()
        run_chain_measured(self.chain, items, metrics)
        counts = metrics.as_dict()
        return [(item.record, item.error, counts if i == 0 else None) for i, item in enumerate(items)]


class RemoteChain:
    """``ray.mode: chain``: a shard is cut into chunks of ``batch_size``; each runs the whole chain on one
    actor of the pool (all chunks in flight at once, spread over the actors)."""

    def __init__(self, pool: ActorPool) -> None:
        self.pool = pool
        self.pools = [pool]

    def run(self, items: list[IngestedItem], metrics: ChainMetrics | None = None) -> list[IngestedItem]:
        metrics = metrics if metrics is not None else ChainMetrics()
        for item, (record, error, counts) in zip(items, self.pool.call(items), strict=True):
            item.record, item.error = record, error
            item.scratch.clear()
            if counts:
                metrics.merge(counts)
        return items

    __call__ = run

    def close(self) -> None:
        self.pool.close()


def _ready(pools: list[ActorPool]) -> None:
    """Wait for every actor (they load in parallel); on failure kill them all."""
    try:
        for pool in pools:
            pool.wait_ready()
    except BaseException:
        for pool in pools:
            pool.close()
        raise


def build_ray_chain(annotate_cfg: AnnotateConfig, ray_cfg: RayConfig) -> PipelinedChain | RemoteChain:
    """The configured chain with every annotator in a Ray actor pool (Ray must be initialised).

    Stages sharing a backend (segmenter + stability) share its pool. Blocks until every actor has loaded.
    ``tiny: true`` backends are created here first (in the absolute ``tiny_models_dir``, which actors on other
    nodes must see: shared storage on a cluster).
    """
    from pipeline.stages import Chain
    from pipeline.tiny_models import materialize_tiny

    annotate_cfg = materialize_tiny(annotate_cfg, Path(annotate_cfg.tiny_models_dir).resolve())
    if ray_cfg.mode == "chain":
        resources = ray_cfg.resources.get("chain") or ray_cfg.default
        classes = {(kind, cfg["backend"]): annotators.registry.resolve(kind, cfg["backend"])
                   for kind, cfg in stage_backends(annotate_cfg).values()}
        pool = ActorPool("chain", ChainBackend, {"annotate": annotate_cfg.model_dump(mode="json"), "classes": classes},
                         resources, ray_cfg.actor_start_timeout_s)
        _ready([pool])
        return RemoteChain(pool)
    chain = Chain.from_config(annotate_cfg)  # backends are built (not loaded) here: config errors surface early
    backends = stage_backends(annotate_cfg)
    proxies: dict[int, RemoteAnnotator] = {}
    pools: list[ActorPool] = []
    for stage in chain.stages:
        if stage.annotator is None:
            continue
        if id(stage.annotator) not in proxies:
            kind, backend_cfg = backends[stage.name]
            backend_cls = annotators.registry.resolve(kind, backend_cfg["backend"])
            pools.append(ActorPool(stage.name, backend_cls, backend_cfg, stage_resources(ray_cfg, stage.name, kind),
                                   ray_cfg.actor_start_timeout_s))
            proxies[id(stage.annotator)] = RemoteAnnotator(pools[-1])
        stage.annotator = proxies[id(stage.annotator)]
    _ready(pools)
    return PipelinedChain(chain, ray_cfg.batch_size, ray_cfg.max_in_flight, pools)
