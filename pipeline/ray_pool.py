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
per-image error rows); an actor failing ``max_consecutive_errors`` calls in a row is replaced (a sticky CUDA
error); a dead actor raises ``annotators.WorkerLost`` and the pool starts a replacement, on which the caller
retries the call bisected (``pipeline.worker_deaths``: a poison input ends as one error row); calls that were
only queued on the dead actor are sent again, not blamed (``pipeline.call_ledger``). Replacements are started by
the pool's ``ActorSet``: in the driver, or — once the pool is shared with shard tasks (``ActorPool.share``,
``flow.concurrent_shards > 1``) — in a keeper actor the driver owns, which a shard task's ``PoolClient`` asks for a
replacement (one per death, however many tasks report it) and for the live set; a poison input is then bisected
to one error row inside the shard task too. Nothing here imports Prefect.

Images enter Ray once (``ray.share_images``, default on): a caller puts each image into the object store once and
every pool gets its reference (``pipeline.ray_images``); ``ray.resources.<stage>.max_side`` sends a stage the image
downscaled at the source.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import annotators
import ray_runtime
from pipeline import call_ledger, ray_images
from data_schemas import PIPELINE_VERSION, AnnotateConfig
from data_schemas.config import RayConfig, StageResources
from pipeline.chain_runner import ChainMetrics, PipelinedChain, run_chain_measured
from pipeline.worker_deaths import call_bisecting, poison_reason

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

    def info(self) -> dict[str, Any]:
        """What this actor runs and where: backend name/version, pid, python, the GPUs Ray gave it."""
        import sys

        import ray

        return {"name": self.backend.name, "version": self.backend.version, "pid": os.getpid(),
                "python": sys.executable, "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def call(self, call_id: str, *batch: Sequence[Any]) -> list[Any]:
        call_ledger.mark_started(call_id)  # a death from now on is this call's (``pipeline.call_ledger``)
        return list(self.backend(*ray_images.resolve(batch)))  # images may come as object-store references


def _load_error(exc: BaseException) -> str:
    """The backend's own error from Ray's wrapper: its last line, plus the line of the error it chains from
    (e.g. the real ``ImportError`` behind a "failed to import" message)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    causes = [line for line in lines[:-1] if re.match(r"^[A-Za-z_][\w.]*(Error|Exception): ", line)]
    detail = lines[-1] if lines else type(exc).__name__
    return detail if not causes or causes[-1] == detail else f"{detail} (caused by {causes[-1]})"


def _lost_errors() -> tuple[type[BaseException], ...]:
    from ray import exceptions as rex

    return (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError, rex.LocalRayletDiedError,
            rex.OutOfMemoryError, rex.ObjectLostError)


class ActorSet:
    """The actors of one pool and how to start more: the one place replacements are started.

    Lives in the driver's ``ActorPool`` or, once the pool is shared with shard tasks (``ActorPool.share``), in a
    keeper actor the driver owns (``ray.remote(ActorSet)``), which every process's view of the pool asks for a
    replacement of a dead actor and for the live set. ``replace`` is keyed by the dead actor: several clients
    reporting the same death get one replacement. The backend and its config travel as object-store references
    resolved only in the annotator actors, so the keeper never imports the backend (its stage may run in another
    environment, ``ray.resources.<stage>.runtime_env``).
    """

    def __init__(self, label: str, options: dict[str, Any], args: list[Any], prefix: str, spawned: int = 0,
                 actors: Sequence[Any] = (), gone: Sequence[Any] = (), replaced: int = 0) -> None:
        import ray

        self.label, self.options, self.args, self.prefix = label, options, list(args), prefix
        self.spawned, self.replaced = spawned, replaced
        self.live, self.gone = list(actors), list(gone)  # gone: their ledger entries are dropped at close
        self._remote = ray.remote(AnnotatorActor)
        self._lock = threading.Lock()  # in the driver, the chain's threads replace actors concurrently

    def start(self, n: int) -> list[Any]:
        """Start ``n`` more actors; returns the live set."""
        with self._lock:
            for _ in range(n):
                self.live.append(self._spawn())
            return list(self.live)

    def _spawn(self):
        self.spawned += 1
        return self._remote.options(name=f"{self.prefix}-{self.spawned}", **self.options).remote(*self.args)

    def actors(self) -> list[Any]:
        return list(self.live)

    def replace(self, actor: Any) -> list[Any]:
        """``actor`` died or broke: start one replacement unless that was done already; returns the live set."""
        with self._lock:
            if actor in self.live:
                self.live.remove(actor)
                self.gone.append(actor)
                self.live.append(self._spawn())
                self.replaced += 1
                log.warning("pool %s: actor died or broke; started a replacement (%d so far)", self.label,
                            self.replaced)
            return list(self.live)

    def replaced_count(self) -> int:
        return self.replaced

    def state(self) -> dict[str, Any]:
        """Constructor arguments of a copy (how the set moves into a keeper actor)."""
        return {"label": self.label, "options": self.options, "args": self.args, "prefix": self.prefix,
                "spawned": self.spawned, "actors": self.live, "gone": self.gone, "replaced": self.replaced}

    def close(self) -> None:
        """Kill every live actor; drop the ledger entries of every actor this set had."""
        import ray

        for actor in self.live:
            ray.kill(actor, no_restart=True)
        for actor in [*self.live, *self.gone]:
            call_ledger.forget(actor)
        self.live, self.gone = [], []


class KeptSet:
    """An ``ActorSet`` held by a keeper actor, called over Ray: the same methods, blocking."""

    def __init__(self, keeper: Any) -> None:
        self.keeper = keeper

    def _get(self, ref):
        import ray

        return ray.get(ref)

    def start(self, n: int) -> list[Any]:
        return self._get(self.keeper.start.remote(n))

    def actors(self) -> list[Any]:
        return self._get(self.keeper.actors.remote())

    def replace(self, actor: Any) -> list[Any]:
        return self._get(self.keeper.replace.remote(actor))

    def replaced_count(self) -> int:
        return self._get(self.keeper.replaced_count.remote())

    def close(self) -> None:
        import ray

        try:
            self._get(self.keeper.close.remote())
        finally:
            ray.kill(self.keeper, no_restart=True)  # the replacements it started share its fate


class PoolClient:
    """Calls into a set of actors of one backend: ``call`` fans a batch out in chunks of ``batch_size`` to the
    least-busy actors. What an ``ActorPool`` becomes when it is pickled into a shard task on another process
    (``pipeline.ray_shards``): it uses the pool's actors; a dead actor is replaced through the pool's keeper
    (``ActorPool.share``: every process asks the same ``ActorSet``, so one death gets one replacement) and the
    call is bisected onto the replacement as in the driver. Without a keeper (a pool pickled unshared) a dead
    actor is only dropped, and once none is left ``WorkerLost`` fails the shard until the driver heals the pool."""

    #: An actor failing this many calls in a row, with no success between, is taken for broken (a sticky CUDA
    #: error) and replaced. Bisecting one bad input in a batch of 2^k fails at most k + 1 calls in a row.
    max_consecutive_errors = 10

    def __init__(self, label: str, name: str, version: str, actors: Sequence[Any], batch_size: int,
                 share_images: bool = True, max_side: int | None = None, keeper: Any = None) -> None:
        self.label, self.name, self.version, self.batch_size = label, name, version, batch_size
        self.share_images, self.max_side = share_images, max_side
        self._lock = threading.Lock()
        self._busy: dict[Any, int] = dict.fromkeys(actors, 0)  # actor handle -> calls in flight
        self._errors: dict[Any, int] = {}  # actor handle -> calls failed in a row
        self._retiring: dict[Any, int] = {}  # actor taken for broken -> its calls still in flight (killed at 0)
        self._dropped: set[Any] = set()  # actors this view saw die or retired: never taken back from a live set
        self._keeper = keeper
        self._set: ActorSet | KeptSet | None = KeptSet(keeper) if keeper is not None else None
        self._synced = keeper is None  # a pickled view reads the keeper's live set before its first call

    @property
    def actors(self) -> list[Any]:
        with self._lock:
            return list(self._busy)

    def wait_ready(self) -> None:
        """The actors were ready when the pool was pickled."""

    def heal(self) -> int:
        """Only the driver's ``ActorPool`` probes actors; here nothing to do."""
        return 0

    def recycle(self) -> int:
        """Only the driver's ``ActorPool`` replaces every actor; here nothing to do."""
        return 0

    def _sync(self, live: Sequence[Any]) -> None:
        with self._lock:
            self._take(live)

    def _take(self, live: Sequence[Any]) -> None:  # with self._lock held
        """Take ``live`` (the set's current actors) as this view's: new ones join idle, replaced ones leave."""
        for actor in live:
            if actor not in self._busy and actor not in self._dropped:
                self._busy[actor] = 0
        for actor in [a for a in self._busy if a not in live]:
            del self._busy[actor]

    def _acquire(self):
        with self._lock:
            if not self._busy and self._set is not None:
                self._take(self._set.actors())
            if not self._busy:
                raise annotators.WorkerLost(f"{self.label}: no live actor left in this process's view of the pool")
            actor = min(self._busy, key=self._busy.__getitem__)
            self._busy[actor] += 1
            return actor

    def _release(self, actor, dead: bool, failed: bool = False) -> None:
        """One call on ``actor`` ended. A dead actor leaves the set and is replaced (``_replace``); an actor that
        failed ``max_consecutive_errors`` calls in a row too, and is killed once its calls in flight end (a kill
        now would turn the other threads' calls on it into worker deaths)."""
        kill = False
        with self._lock:
            if actor in self._retiring:
                self._retiring[actor] -= 1
                kill = self._retiring[actor] <= 0
                if kill:
                    del self._retiring[actor]
            elif actor in self._busy:
                self._busy[actor] -= 1
                errors = self._errors[actor] = self._errors.get(actor, 0) + 1 if failed and not dead else 0
                if dead:
                    self._replace(actor)
                elif errors >= self.max_consecutive_errors:
                    log.warning("pool %s: an actor failed %d calls in a row; replacing it", self.label, errors)
                    in_flight = self._busy[actor]
                    self._replace(actor)
                    kill = in_flight == 0
                    if not kill:
                        self._retiring[actor] = in_flight
            if dead or kill:
                self._errors.pop(actor, None)
        if kill:
            import ray

            call_ledger.retire(actor)
            ray.kill(actor, no_restart=True)

    def _replace(self, actor) -> None:  # with self._lock held
        """Drop ``actor`` from this view; have it replaced in the pool's set and take the set's live actors (a
        round trip to the keeper when shared: under the lock, so no thread finds the view empty meanwhile)."""
        self._busy.pop(actor, None)
        self._dropped.add(actor)
        if self._set is not None:
            self._take(self._set.replace(actor))

    #: How often one chunk is sent again after the actor it waited for died before running it (a death of the
    #: call queued ahead of it); past this the death counts as the chunk's own.
    max_resends = 16

    def call(self, *batch: Sequence[Any]) -> list[Any]:
        """Run the backend on ``batch`` (per-image argument lists); one output per image, in order.

        A chunk whose actor died while it was still queued there (``pipeline.call_ledger``) is sent again to a
        live actor; a death during its own run raises ``WorkerLost`` once every chunk has ended."""
        import ray

        if not self._synced and self._set is not None:
            self._sync(self._set.actors())
            self._synced = True
        n = len(batch[0]) if batch else 0
        step = self.batch_size
        chunks = [ray_images.share_batch([arg[start:start + step] for arg in batch], self.max_side,
                                         self.share_images) for start in range(0, n, step)]
        results: list[list[Any] | None] = [None] * len(chunks)
        pending = [self._send(index, chunk) for index, chunk in enumerate(chunks)]
        resends = [0] * len(chunks)
        failure: BaseException | None = None
        while pending:  # wait for every chunk so no call outlives this one
            index, actor, call_id, ref = pending.pop(0)
            try:
                results[index] = ray.get(ref)
                self._release(actor, dead=False)
            except _lost_errors() as exc:
                self._release(actor, dead=True)
                if not call_ledger.was_running(actor, call_id) and resends[index] < self.max_resends:
                    resends[index] += 1
                    try:
                        pending.append(self._send(index, chunks[index]))
                        continue
                    except annotators.WorkerLost as lost:  # no live actor left to send it to
                        exc = lost
                failure = failure or annotators.WorkerLost(f"{self.label}: {type(exc).__name__}: {exc}")
            except ray.exceptions.RayTaskError as exc:
                self._release(actor, dead=False, failed=True)
                cause = exc.cause if isinstance(exc.cause, Exception) else exc
                failure = failure if isinstance(failure, annotators.WorkerLost) else (failure or cause)
        if failure is not None:
            raise failure
        return [output for chunk in results for output in chunk]

    def _send(self, index: int, chunk: list[Any]) -> tuple[int, Any, str, Any]:
        """Chunk ``index`` to the least-busy actor: ``(index, actor, call id, object ref)``."""
        actor, call_id = self._acquire(), call_ledger.new_call_id()
        return index, actor, call_id, actor.call.remote(call_id, *chunk)

    def __reduce__(self):
        return (PoolClient, (self.label, self.name, self.version, self.actors, self.batch_size, self.share_images,
                             self.max_side, self._keeper))


class ActorPool(PoolClient):
    """``size`` actors of one backend, started here; ``call`` fans a batch out in chunks, replaces actors that
    die. Pickled (into a shard task), it travels as a ``PoolClient`` of the same actors; ``share()`` first moves
    its ``ActorSet`` into a keeper actor so that the shard tasks can have dead actors replaced too."""

    def __init__(self, label: str, backend_cls: type, cfg: dict[str, Any], resources: StageResources,
                 start_timeout_s: float = 300.0, share_images: bool = True) -> None:
        import ray

        super().__init__(label, "", "", [], resources.batch_size, share_images, resources.max_side)
        self.resources, self.start_timeout_s = resources, start_timeout_s
        options = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus}
        if resources.runtime_env:  # merged by Ray over the job's runtime_env (env_vars merge, other keys replace)
            options["runtime_env"] = dict(resources.runtime_env)
        self._args = [ray.put(backend_cls), ray.put(dict(cfg))]  # held here: the driver owns them
        prefix = f"umg-{label}-{uuid.uuid4().hex[:6]}"  # actor names, e.g. for ray.get_actor in tests
        self._set = ActorSet(label, options, self._args, prefix)
        self._sync(self._set.start(resources.pool_size))
        self.placements: list[dict[str, Any]] = []  # AnnotatorActor.info() of each actor, once ready

    @property
    def replaced(self) -> int:
        """Actors replaced so far (by any process's view of the pool)."""
        return self._set.replaced_count()

    def share(self) -> None:
        """Move the actor set into a keeper actor (CPU-less, owned by this process), so that every ``PoolClient``
        pickled from now on has dead actors replaced through it. Idempotent."""
        import ray

        with self._lock:
            if self._keeper is not None:
                return
            keeper = ray.remote(ActorSet).options(num_cpus=0).remote(**self._set.state())
            self._keeper, self._set = keeper, KeptSet(keeper)
        log.info("pool %s: actor set moved to a keeper actor (shard tasks replace dead actors through it)",
                 self.label)

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
            raise annotators.AnnotatorError(f"{self.label}: the backend failed to load: {_load_error(exc)}") from exc
        self.placements = infos
        self.name, self.version = infos[0]["name"], infos[0]["version"]
        log.info("pool %s: %d actors ready (%s@%s; pids %s, GPUs %s)", self.label, len(infos), self.name,
                 self.version, [i["pid"] for i in infos], [i["cuda_visible_devices"] for i in infos])

    def recycle(self) -> int:
        """Replace every actor (after a breaker trip: the stage failed on an ordinary image, its actors are taken
        for broken); returns how many were replaced."""
        import ray

        with self._lock:
            old = self._set.actors()
            for actor in old:
                call_ledger.retire(actor)  # calls other threads and shard tasks still have on it are sent again
                ray.kill(actor, no_restart=True)
                self._replace(actor)
        return len(old)

    def heal(self, probe_timeout_s: float = 2.0) -> int:
        """Replace the actors that died while serving calls from other processes (shard tasks); returns how many.
        A busy actor that does not answer within ``probe_timeout_s`` counts as alive."""
        import ray

        self._sync(self._set.actors())  # replacements started by the shard tasks through the keeper
        probes = [(actor, actor.info.remote()) for actor in self.actors]
        dead = []
        for actor, ref in probes:
            try:
                ray.get(ref, timeout=probe_timeout_s)
            except _lost_errors():
                dead.append(actor)
            except ray.exceptions.GetTimeoutError:
                pass
        with self._lock:
            for actor in dead:
                self._replace(actor)
        return len(dead)

    def close(self) -> None:
        import ray

        for actor in self.actors:  # this view's, should the set's keeper be gone
            ray.kill(actor, no_restart=True)
        try:
            self._set.close()
        except ray.exceptions.RayError as exc:
            log.warning("pool %s: closing its keeper failed: %s", self.label, exc)
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
    return cfg.model_stages()


def stage_resources(ray_cfg: RayConfig, stage: str, kind: str) -> StageResources:
    """``ray.resources[stage]``, else ``ray.resources[kind]``, else ``ray.default``."""
    return ray_cfg.resources_for(stage, kind)


AUTO_DEVICES = (None, "auto")


def _takes_device(backend_cls: type) -> bool:
    return "device" in inspect.signature(backend_cls.__init__).parameters


def pin_devices(annotate_cfg: AnnotateConfig, ray_cfg: RayConfig) -> AnnotateConfig:
    """The device each stage's actors must use, from the GPUs Ray gives them (a copy of ``annotate_cfg``).

    A stage whose actors get ``num_gpus > 0`` and whose backend says ``device: auto`` (or nothing) gets
    ``device: cuda``: inside the actor, a missing CUDA device then fails the load loudly instead of ``auto``
    quietly running a 7B model on the CPU. A backend that asks for CUDA in a stage Ray gives no GPU fails
    here: Ray hides the GPUs from such actors (``CUDA_VISIBLE_DEVICES=""``).

    Raises:
        AnnotatorError: naming the stage whose ``device`` asks for CUDA without ``num_gpus``.
    """
    out = annotate_cfg.model_copy(deep=True)
    chain = ray_cfg.mode == "chain"
    for stage, (kind, backend_cfg) in out.model_stages().items():
        resources = ray_cfg.resources_for("chain", "chain") if chain else ray_cfg.resources_for(stage, kind)
        device = backend_cfg.get("device")
        if str(device or "").startswith("cuda") and resources.num_gpus == 0:
            where = "ray.resources.chain" if chain else f"ray.resources.{stage} (or .{kind})"
            raise annotators.AnnotatorError(
                f"{stage}: device {device!r} but its Ray actors get num_gpus 0, so Ray hides every GPU from them; "
                f"set num_gpus in {where}")
        if resources.num_gpus > 0 and device in AUTO_DEVICES:
            backend_cls = annotators.registry.resolve(kind, backend_cfg["backend"])
            if _takes_device(backend_cls):
                backend_cfg["device"] = "cuda"  # the dicts of model_stages() are the copy's own
    return out


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

        def poisoned(item: IngestedItem, exc: BaseException) -> None:
            item.error = poison_reason(self.pool.label, exc)

        for item, output in zip(items, call_bisecting(items, self.pool.call, poisoned), strict=True):
            if output is None:  # a poison input: its error is set
                continue
            record, error, counts = output
            item.record, item.error = record, error
            item.scratch.clear()
            if counts:
                metrics.merge(counts)
        return items

    __call__ = run

    def heal(self) -> int:
        return self.pool.heal()

    def recycle(self, stage: str | None = None) -> int:
        """Replace the chain actors (every stage runs in each of them)."""
        return self.pool.recycle()

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
    annotate_cfg = pin_devices(annotate_cfg, ray_cfg)
    if ray_cfg.mode == "chain":
        resources = ray_cfg.resources_for("chain", "chain")
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
                                   ray_cfg.actor_start_timeout_s, ray_cfg.share_images))
            proxies[id(stage.annotator)] = RemoteAnnotator(pools[-1])
        stage.annotator = proxies[id(stage.annotator)]
    _ready(pools)
    return PipelinedChain(chain, ray_cfg.batch_size, ray_cfg.max_in_flight, pools)
