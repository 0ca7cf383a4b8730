"""Run a source through ingest (and optional annotation) into shards, one input shard at a time.

``build_shards`` is the in-process engine behind ``umg build``; orchestrators call
``process_shard`` per planned shard. Resume: finished shards are skipped, partial files are
discarded, and ``_plan.json`` pins the plan so a rerun with another shard size or input list is
refused instead of writing some inputs twice.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import hashlib
import json
import os
import logging
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from data_schemas import ImageLimits, ImageRecord, ShardStats
from data_schemas.config import BreakerConfig
from pipeline.breaker import ShardTripped, check_breaker
from pipeline.canary import failure_is_systematic
from pipeline.images import ImageError
from pipeline.ingest import IngestedItem, ingest_item
from pipeline.key_ledger import KeyLedger
from pipeline.output_lease import LEASE_NAME, ObjectLease, unsupported
from pipeline.shards import (
    FinishedKeys,
    ShardError,
    ShardWriter,
    discard_partial,
    finished_shards,
    write_build_manifest,
)
from pipeline.sources.base import InputShard, Source, SourceItem, plan_shards, printable_id
from pipeline.storage import StoragePath, as_path, is_local, names_in, write_bytes_whole

log = logging.getLogger(__name__)

PLAN_NAME = "_plan.json"
LOCK_NAME = "_build.lock"
#: Seconds a build's lease on an object-store output lives without renewal (``pipeline.output_lease``).
LEASE_TTL_S = 60.0
_HELD_LOCKS: dict[str, int | ObjectLease] = {}  # build dir -> fd of its flock'd lock file or its lease, while held

#: Optional annotation step: takes the ingested items of one shard, returns them annotated (same order).
Annotate = Callable[[list[IngestedItem]], list[IngestedItem]]


@dataclass
class BuildSummary:
    build_dir: StoragePath
    planned: int
    skipped: list[str] = field(default_factory=list)
    written: list[ShardStats] = field(default_factory=list)
    repaired: list[ShardStats] = field(default_factory=list)

    @property
    def n_inputs(self) -> int:
        return sum(s.n_inputs for s in self.written)


def _plan_fingerprint(refs: Sequence[str], shard_size: int) -> dict:
    digest = hashlib.sha256("\n".join(refs).encode("utf-8", "surrogateescape")).hexdigest()  # non-UTF-8 names
    return {"n_refs": len(refs), "shard_size": shard_size, "refs_sha256": digest}


def check_output_dir(build_dir: StoragePath) -> None:
    """Refuse an output that cannot hold this build, before any model is loaded or file touched.

    The output must be a writable folder (or object-store prefix) that is new, empty, or holds a build
    (``_plan.json``): resuming deletes unfinished shard files (``*.tmp``, ``NNNNN.tar`` without its parquet),
    which must never hit unrelated files in a folder given by mistake.

    Raises:
        ShardError: naming the output and what is wrong with it (one line).
    """
    if build_dir.is_file():
        raise ShardError(f"output {build_dir} exists and is not a directory")
    others = [name for name in names_in(build_dir) if name != LOCK_NAME and not name.startswith(LEASE_NAME)]
    if others and PLAN_NAME not in others:
        shown = ", ".join(others[:3]) + (", …" if len(others) > 3 else "")
        raise ShardError(f"output {build_dir} is not empty ({shown}) and holds no build ({PLAN_NAME}); "
                         "choose a new or empty directory")
    if not is_local(build_dir):
        return  # an object store has no folder to make; pin_plan's first write shows whether we may write
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=build_dir):
            pass
    except OSError as exc:
        raise ShardError(f"output {build_dir} is not a writable directory: {exc.strerror or exc}") from exc


def lock_build(build_dir: StoragePath, lease_ttl_s: float = LEASE_TTL_S) -> None:
    """Keep other builds out of ``build_dir`` until ``release_build`` or this process ends.

    Local: an exclusive ``flock`` on ``build_dir/_build.lock``; the kernel drops it when its process dies, so a
    killed build never leaves a stale lock. ``s3://`` and ``gs://``: a lease object, ``build_dir/_build.lease``,
    taken with a conditional write and renewed while the build runs (``pipeline.output_lease``); a killed build's lease is
    taken over once it was not renewed for ``lease_ttl_s``. A second build is refused at once (not after it trips
    over the first one's temp files). Re-entrant within one process (the flow and ``build_shards`` both prepare).

    Raises:
        ShardError: another build holds the output (the message names its pid, and host for a lease), or an
            object store that cannot be leased (no conditional writes, neither ``s3://`` nor ``gs://``).
    """
    key = str(build_dir.resolve() if is_local(build_dir) else build_dir)
    if key in _HELD_LOCKS:
        return
    if not is_local(build_dir):
        refusal = unsupported(build_dir)
        if refusal:
            raise ShardError(refusal)
        lease = ObjectLease(build_dir, lease_ttl_s)
        lease.acquire()
        _HELD_LOCKS[key] = lease
        return
    path = build_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ShardError(f"output {build_dir}: cannot create its lock file {path}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 64, 0).decode("ascii", errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ShardError(f"output {build_dir} is being written by another build (pid {holder}); wait for it to "
                             "finish or choose another output") from None
        raise ShardError(f"output {build_dir}: cannot lock {path}: {exc.strerror or exc}") from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD_LOCKS[key] = fd


def _release_leases() -> None:
    """At exit (a build that failed before ``release_build``): delete this process's leases, so the next run need
    not wait out their TTL. (Like an ``flock``, which the kernel drops at exit.)"""
    for key, held in list(_HELD_LOCKS.items()):
        if isinstance(held, ObjectLease):
            _HELD_LOCKS.pop(key, None)
            try:
                held.release()
            except Exception as exc:  # noqa: BLE001 - at exit: report, never mask the process's own outcome
                log.warning("output %s: could not release its lease at exit: %s", key, exc)


atexit.register(_release_leases)


def release_build(build_dir: StoragePath) -> None:
    """Drop the lock or lease ``lock_build`` took (no-op when this process holds none).

    Raises:
        ShardError: the output's lease was taken over by another build while this one ran.
    """
    build_dir = as_path(build_dir)
    held = _HELD_LOCKS.pop(str(build_dir.resolve() if is_local(build_dir) else build_dir), None)
    if isinstance(held, ObjectLease):
        held.release()
    elif held is not None:
        os.close(held)  # closing the descriptor releases the flock


def pin_plan(build_dir: StoragePath, source: Source, shard_size: int) -> list[InputShard]:
    """Plan the shards; refuse to continue a build that was planned differently."""
    refs = source.list_refs()
    fingerprint = _plan_fingerprint(refs, shard_size)
    plan_file = build_dir / PLAN_NAME
    if plan_file.exists():
        try:
            previous = json.loads(plan_file.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise ShardError(f"{plan_file} is unreadable ({exc}); use a new output directory") from exc
        if previous != fingerprint:
            raise ShardError(f"{build_dir} holds a build with a different plan ({_describe(previous)}) than now "
                             f"({_describe(fingerprint)}); use a new output directory or the same inputs and "
                             "shard_size")
    else:
        try:
            write_bytes_whole(plan_file, json.dumps(fingerprint, sort_keys=True).encode("utf-8"))
        except OSError as exc:  # e.g. PermissionError from an object store refusing the credentials
            raise ShardError(f"output {build_dir} is not writable: {exc}") from exc
    return plan_shards(refs, shard_size)


def _describe(plan: Any) -> str:
    if not isinstance(plan, dict):
        return repr(plan)
    return (f"shard_size={plan.get('shard_size')}, {plan.get('n_refs')} inputs, "
            f"input list sha256 {str(plan.get('refs_sha256'))[:12]}")


def prepare_build(build_dir: str | StoragePath, source: Source, shard_size: int, lease_ttl_s: float = LEASE_TTL_S,
                  lock: bool = True) -> tuple[list[InputShard], set[str], FinishedKeys]:
    """Check the output, discard partial files, pin the plan.

    Returns ``(plan, finished shard names, keys already written)`` — the keys are read shard by shard when a
    key ledger takes them (``FinishedKeys``), not here; a caller with nothing left to do
    (every planned shard finished) can stop before loading any model.

    Takes the output's lock (``lock_build``; ``lease_ttl_s`` for an ``s3://`` or ``gs://`` output's lease): a second build
    into it is refused until this one ends. ``lock=False`` (config ``lock_output: false``) takes none: the caller
    keeps one build per output itself.

    Raises:
        ShardError: the output is not a usable folder (``check_output_dir``), another build holds it, or it
            holds another plan.
    """
    build_dir = as_path(build_dir)
    check_output_dir(build_dir)
    if lock:
        lock_build(build_dir, lease_ttl_s)
    else:
        log.warning("output %s: not locked (lock_output: false); a second build into it would not be refused",
                    build_dir)
    discard_partial(build_dir)
    plan = pin_plan(build_dir, source, shard_size)
    done = finished_shards(build_dir)
    return plan, set(done), FinishedKeys(build_dir, tuple(done))


def _error_reason(exc: Exception) -> str:
    if isinstance(exc, (ImageError, ValueError)):
        return str(exc)
    return f"internal: {type(exc).__name__}: {exc}"


def _revalidate(item: IngestedItem) -> None:
    """Stages assign record fields without validation; check the final record once before writing."""
    if item.error is None:
        try:
            item.record = ImageRecord.model_validate(item.record.model_dump())
        except ValueError as exc:
            item.error = f"invalid_record: {exc}"


def _check_breaker(shard: str, errors: list[str | None], breaker: BreakerConfig, annotate: Annotate,
                   limits: ImageLimits) -> None:
    """``check_breaker``, confirmed on a control image (``pipeline.canary``): a trip only when the stage fails on
    an ordinary image too; otherwise the inputs failed for reasons of their own and the shard is committed."""
    try:
        check_breaker(shard, errors, breaker)
    except ShardTripped as trip:
        systematic, why = failure_is_systematic(annotate, limits)
        if systematic:
            raise ShardTripped(f"{trip} ({why})", trip.stage) from None
        log.warning("shard %s: %s; %s, so these inputs failed on their own and become error rows", shard, trip, why)


def fill_shard(
    writer: ShardWriter,
    source: Source,
    items: Iterable[SourceItem],
    limits: ImageLimits,
    keys: KeyLedger,
    annotate: Annotate | None = None,
    breaker: BreakerConfig | None = None,
) -> int:
    """Ingest (and annotate) ``items`` into ``writer``, one manifest row each; returns how many were read.

    ``keys``: the build's key ledger (keys are claimed just before writing, so shards may run at once).
    ``breaker``: when one stage failed on most of the annotated inputs and fails on an ordinary control image
    too (``pipeline.canary``), raise ``ShardTripped`` instead of writing (the caller's writer then discards the
    shard, which stays unfinished).
    """
    ingested: list[IngestedItem] = []
    n_items = 0
    for item in items:
        n_items += 1
        shown = printable_id(item.source_id)
        if shown != item.source_id:  # a non-UTF-8 file or member name: stored readable, the row says so
            item.known.notes.append("not_utf8: name bytes that are not UTF-8 are shown as \\xNN in source_id")
            item.source_id = shown
        try:
            ingested.append(ingest_item(item, source.kind, limits))
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error row
            log.info("shard %s: %s failed: %s", writer.name, item.source_id, exc)
            writer.write_error(item.key, item.source_id, _error_reason(exc))
    if annotate is not None and ingested:
        ingested = annotate(ingested)
        if breaker is not None:
            _check_breaker(writer.name, [done.error for done in ingested], breaker, annotate, limits)
        for done in ingested:
            _revalidate(done)
    writer.taken_keys |= keys.claim(writer.name, [done.record.key for done in ingested if done.error is None])
    for done in ingested:
        if done.error is not None:
            writer.write_error(done.record.key, done.record.source_id, done.error)
        else:
            writer.write(done.record, done.decoded.jpg, notes="; ".join(done.notes) or None)
    return n_items


def process_shard(
    source: Source,
    shard: InputShard,
    build_dir: str | StoragePath,
    limits: ImageLimits,
    keys: KeyLedger,
    annotate: Annotate | None = None,
    breaker: BreakerConfig | None = None,
) -> ShardStats:
    """Ingest (and annotate) every input of ``shard`` and commit it; one manifest row per input
    (``fill_shard``; ``ShardTripped`` when the breaker trips: nothing is committed)."""
    if not (as_path(build_dir) / PLAN_NAME).exists():  # the writer would recreate a removed output as a non-build
        raise ShardError(f"output {build_dir} lost its {PLAN_NAME} during the build (removed?); nothing more is "
                         "written: rerun the same command to start it again")
    with ShardWriter(build_dir, shard.name, taken_keys=set()) as writer:
        n_items = fill_shard(writer, source, source.read(shard.refs), limits, keys, annotate, breaker)
        if n_items != len(shard.refs):
            raise ShardError(f"source {source.kind} yielded {n_items} items for {len(shard.refs)} refs")
        return writer.commit()


def build_shards(
    source: Source,
    build_dir: str | StoragePath,
    shard_size: int,
    limits: ImageLimits,
    annotate: Annotate | None = None,
    on_shard: Callable[[ShardStats], None] | None = None,
    on_plan: Callable[[int, int], None] | None = None,
    breaker: BreakerConfig | None = None,
    retry_errors: bool = False,
    prepared: tuple[list[InputShard], set[str], FinishedKeys] | None = None,
) -> BuildSummary:
    """Write every unfinished planned shard of ``source`` into ``build_dir``, then the build manifest (once).

    ``on_plan(n_planned, n_finished)`` is called once after planning, ``on_shard(stats)`` per written shard.
    ``retry_errors``: then rebuild the error rows of an infrastructure kind in finished shards
    (``pipeline.repair``); the repaired shards are listed in ``summary.repaired``.
    ``prepared`` is ``prepare_build``'s result when the caller already ran it (e.g. to skip loading models).
    """
    build_dir = as_path(build_dir)
    plan, done, keys_in_use = prepared if prepared is not None else prepare_build(build_dir, source, shard_size)
    keys = KeyLedger(keys_in_use)
    if on_plan is not None:
        on_plan(len(plan), len(done & {s.name for s in plan}))
    summary = BuildSummary(build_dir=build_dir, planned=len(plan))
    for shard in plan:
        if shard.name in done:
            summary.skipped.append(shard.name)
            continue
        stats = process_shard(source, shard, build_dir, limits, keys, annotate, breaker)
        summary.written.append(stats)
        if on_shard is not None:
            on_shard(stats)
    if retry_errors:
        from pipeline.repair import repair_shard, shards_to_repair  # repair builds on this module

        for shard in shards_to_repair(build_dir, plan):
            summary.repaired.append(repair_shard(source, shard, build_dir, limits, keys, annotate, breaker))
    write_build_manifest(build_dir)  # once per run: per shard it would re-read every finished shard (O(N^2))
    release_build(build_dir)  # after a failure the lock stays until the process ends (re-entrant here)
    return summary
