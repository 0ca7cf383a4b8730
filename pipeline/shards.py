"""WebDataset shards with per-input manifests, written crash-safe and read back as records.

A build directory (a local folder or an object-store prefix, ``pipeline.storage``) holds, per finished shard
``NNNNN``::

    NNNNN.tar          WebDataset samples: <key>.jpg, <key>.txt (best caption), <key>.json (ImageRecord)
    NNNNN.parquet      one row per input (SHARD_ROW_SCHEMA): key, source_id, status ok|error, error, counts
    NNNNN.stats.json   ShardStats: the shard's done-marker, written last
    _manifest.parquet  one row per finished shard (BUILD_MANIFEST_SCHEMA), written once at the end of a run

The three shard files are written locally first (``NNNNN.tar.tmp`` … beside the shard on a local disk, in a
temp folder for an object store) and then published one after another, each appearing whole (a rename, or an
upload that shows the object only once complete): parquet, tar, then the stats file. A shard counts as
finished only when all three exist; a crash in between leaves a tar or parquet without stats, which
``discard_partial`` removes so the next run rewrites that shard from scratch.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_schemas import (
    BUILD_MANIFEST_SCHEMA,
    COUNT_FIELDS,
    KEY_PATTERN,
    PIPELINE_VERSION,
    SHARD_ROW_SCHEMA,
    ImageRecord,
    ShardRow,
    ShardStats,
)
from pipeline.sources.base import printable_id
from pipeline.storage import StoragePath, as_path, is_local, names_in, publish, staging_dir, write_bytes_whole

log = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.parquet"
TMP_SUFFIX = ".tmp"
SHARD_SUFFIXES = (".tar", ".parquet", ".stats.json")


class ShardError(RuntimeError):
    """A shard on disk is missing pieces or holds data that does not validate."""


def shard_paths(build_dir: str | StoragePath, name: str) -> dict[str, StoragePath]:
    """``{".tar": path, ".parquet": path, ".stats.json": path}`` of shard ``name`` in ``build_dir`` (a local
    folder gives ``Path``s, a URL ``UPath``s; ``pipeline.storage``)."""
    build_dir = as_path(build_dir)
    return {suffix: build_dir / f"{name}{suffix}" for suffix in SHARD_SUFFIXES}


def _tar_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    # Fixed metadata so the same samples give byte-identical tars.
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o444
    info.mtime = 0
    tar.addfile(info, io.BytesIO(payload))


class ShardWriter:
    """Write one shard; use as a context manager so a failure discards the temp files.

    ``write`` / ``write_error`` add one manifest row per input; ``commit`` makes the shard visible.
    Keys must match ``[a-z0-9_-]`` and be unique within the shard and within ``taken_keys``
    (keys already used by other shards of the build); a duplicate becomes an ``error`` row.
    """

    def __init__(self, build_dir: str | StoragePath, name: str, taken_keys: set[str] | None = None) -> None:
        self.build_dir = as_path(build_dir)
        self.name = name
        self._final = shard_paths(self.build_dir, name)
        self._stage, self._own_stage = staging_dir(self.build_dir)
        self._tmp = {suffix: self._stage / f"{name}{suffix}{TMP_SUFFIX}" for suffix in SHARD_SUFFIXES}
        # PAX: a member name over ustar's 100 characters (a 200-character key + ".json") gets a POSIX extended
        # header instead of ``ValueError: name is too long``; shorter names are plain ustar headers as before.
        self._tar = tarfile.open(self._tmp[".tar"], "w", format=tarfile.PAX_FORMAT)
        self._rows: list[ShardRow] = []
        self._keys: set[str] = set()
        self.taken_keys = taken_keys if taken_keys is not None else set()
        self._started = time.perf_counter()
        self._closed = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._closed:
            self.abort()

    def _claim(self, key: str, source_id: str) -> str | None:
        """Return an error reason when ``key`` can't be used, else reserve it."""
        if not KEY_PATTERN.match(key):
            return f"bad_key: {key!r} is not path-safe ([a-z0-9_-])"
        if key in self._keys or key in self.taken_keys:
            return f"duplicate_key: {key!r} already written (source_id {source_id!r} is a second input with it)"
        self._keys.add(key)
        return None

    def write(self, record: ImageRecord, jpg: bytes, notes: str | None = None) -> bool:
        """Add a sample; returns False (and writes an error row) when its key is bad or taken."""
        reason = self._claim(record.key, record.source_id)
        if reason:
            self._rows.append(ShardRow(key=record.key, source_id=record.source_id, status="error", error=reason))
            return False
        _tar_member(self._tar, f"{record.key}.jpg", jpg)
        _tar_member(self._tar, f"{record.key}.txt", record.best_caption().encode("utf-8"))
        _tar_member(self._tar, f"{record.key}.json", record.model_dump_json().encode("utf-8"))
        self._rows.append(ShardRow(key=record.key, source_id=record.source_id, status="ok",
                                   notes=printable_id(notes) if notes else notes, **record.counts()))
        return True

    def copy(self, sample: ShardSample, row: ShardRow) -> None:
        """Carry an ``ok`` sample of an earlier version of this shard over unchanged (raw members, same row)."""
        if row.status != "ok" or row.key != sample.key or sample.key in self._keys:
            raise ShardError(f"shard {self.name}: cannot copy sample {sample.key!r} with row {row.key!r}")
        self._keys.add(sample.key)
        for ext, payload in sample.members.items():
            _tar_member(self._tar, f"{sample.key}.{ext}", payload)
        self._rows.append(row)

    def write_error(self, key: str, source_id: str, error: str) -> None:
        """Record a failed input; nothing goes into the tar. Names in the reason that are not UTF-8 are escaped."""
        self._rows.append(ShardRow(key=key, source_id=printable_id(source_id), status="error",
                                   error=printable_id(error)))

    @property
    def rows(self) -> list[ShardRow]:
        return list(self._rows)

    def commit(self) -> ShardStats:
        """Close the tar, write parquet + stats and publish all three (the stats file, the done-marker, last)."""
        self._tar.close()
        table = pa.Table.from_pylist([row.model_dump() for row in self._rows], schema=SHARD_ROW_SCHEMA)
        pq.write_table(table, self._tmp[".parquet"])
        stats = self._stats()
        self._tmp[".stats.json"].write_text(stats.model_dump_json(indent=1), encoding="utf-8")
        for suffix in (".parquet", ".tar", ".stats.json"):
            publish(self._tmp[suffix], self._final[suffix])
        if is_local(self.build_dir):
            _fsync_dir(self.build_dir)
        self._drop_stage()
        self._closed = True
        self.taken_keys.update(self._keys)
        return stats

    def abort(self) -> None:
        """Discard the temp files of an unfinished shard."""
        if not self._tar.closed:
            self._tar.close()
        for path in self._tmp.values():
            path.unlink(missing_ok=True)
        self._drop_stage()
        self._closed = True

    def _drop_stage(self) -> None:
        if self._own_stage:
            shutil.rmtree(self._stage, ignore_errors=True)

    def _stats(self) -> ShardStats:
        ok = [r for r in self._rows if r.status == "ok"]
        errors = Counter((r.error or "").split(":", 1)[0] for r in self._rows if r.status == "error")
        return ShardStats(
            shard=self.name,
            n_inputs=len(self._rows),
            n_ok=len(ok),
            n_error=len(self._rows) - len(ok),
            counts={field: sum(getattr(r, field) for r in ok) for field in COUNT_FIELDS},
            errors=dict(sorted(errors.items())),
            seconds=round(time.perf_counter() - self._started, 3),
            pipeline_version=PIPELINE_VERSION,
        )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finished_shards(build_dir: str | StoragePath) -> list[str]:
    """Sorted names of shards whose tar, parquet and stats all exist (one listing of ``build_dir``)."""
    return _finished(names_in(as_path(build_dir)))


def _finished(names: Iterable[str]) -> list[str]:
    present = set(names)
    marked = [n[: -len(".stats.json")] for n in present if n.endswith(".stats.json")]
    return sorted(n for n in marked if all(f"{n}{suffix}" in present for suffix in SHARD_SUFFIXES))


def stray_pieces(build_dir: str | StoragePath) -> list[StoragePath]:
    """Shard files (``NNNNN.tar`` …) whose shard lacks one of its three files; build files (``_*``) excluded."""
    build_dir = as_path(build_dir)
    names = names_in(build_dir)
    done = set(_finished(names))
    return [build_dir / name for name in names if not name.startswith("_") and _shard_of(name) not in (None, *done)]


def _shard_of(name: str) -> str | None:
    """``"00001"`` for ``00001.tar`` / ``.parquet`` / ``.stats.json``; None for other names."""
    return next((name[: -len(suffix)] for suffix in SHARD_SUFFIXES if name.endswith(suffix)), None)


def temp_files(build_dir: str | StoragePath) -> list[StoragePath]:
    """Leftover ``*.tmp`` files of a killed writer (only a local build dir has them)."""
    build_dir = as_path(build_dir)
    return [build_dir / name for name in names_in(build_dir) if name.endswith(TMP_SUFFIX)]


def discard_partial(build_dir: str | StoragePath) -> list[StoragePath]:
    """Delete temp files and shard pieces without a complete set; return what was removed."""
    removed = temp_files(build_dir) + stray_pieces(build_dir)
    for path in removed:
        log.warning("discarding partial shard file %s", path)
        path.unlink(missing_ok=True)
    return removed


def read_stats(build_dir: str | StoragePath, name: str) -> ShardStats:
    return ShardStats.model_validate_json(shard_paths(build_dir, name)[".stats.json"].read_text("utf-8"))


def manifest_row(stats: ShardStats) -> dict:
    """The ``_manifest.parquet`` row of one shard (BUILD_MANIFEST_SCHEMA)."""
    return {"shard": stats.shard, "n_inputs": stats.n_inputs, "n_ok": stats.n_ok, "n_error": stats.n_error,
            **{field: stats.counts.get(field, 0) for field in COUNT_FIELDS}}


def write_build_manifest(build_dir: str | StoragePath) -> StoragePath:
    """(Re)write ``_manifest.parquet`` from the finished shards' stats, whole (temp + rename, or one PUT).

    Reads every finished shard's stats once: call it once per run (at its end), not per shard.
    """
    build_dir = as_path(build_dir)
    rows = [manifest_row(read_stats(build_dir, name)) for name in finished_shards(build_dir)]
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=BUILD_MANIFEST_SCHEMA), buffer)
    target = build_dir / MANIFEST_NAME
    write_bytes_whole(target, buffer.getvalue())
    return target


def read_shard_rows(build_dir: str | StoragePath, name: str) -> list[dict]:
    """The per-input manifest rows of one shard."""
    return _read_parquet(shard_paths(build_dir, name)[".parquet"]).to_pylist()


def _read_parquet(path: StoragePath, columns: list[str] | None = None) -> pa.Table:
    with path.open("rb") as handle:
        return pq.read_table(handle, columns=columns)


def shard_keys(build_dir: str | StoragePath, name: str) -> list[str]:
    """Keys of the ``ok`` samples of one finished shard (from its parquet's key and status columns)."""
    table = _read_parquet(shard_paths(build_dir, name)[".parquet"], columns=["key", "status"])
    return [k for k, s in zip(table["key"].to_pylist(), table["status"].to_pylist()) if s == "ok"]


@dataclass(frozen=True)
class FinishedKeys:
    """The ``ok`` keys of finished shards, read one shard at a time when iterated (yields one list per shard),
    so a caller feeding a key ledger never holds them all."""

    build_dir: str | StoragePath
    names: tuple[str, ...]

    def __iter__(self) -> Iterator[list[str]]:
        for name in self.names:
            yield shard_keys(self.build_dir, name)


def taken_keys(build_dir: str | StoragePath) -> set[str]:
    """Keys of ``ok`` samples in the finished shards, as one set (small builds and tests; see ``FinishedKeys``)."""
    return {key for keys in FinishedKeys(build_dir, tuple(finished_shards(build_dir))) for key in keys}


@dataclass
class ShardSample:
    """One sample read back from a tar: raw members by extension (``jpg``, ``txt``, ``json``)."""

    key: str
    members: dict[str, bytes]

    @property
    def jpg(self) -> bytes:
        return self.members["jpg"]

    def record(self) -> ImageRecord:
        """Parse and validate the ``json`` member."""
        return ImageRecord.model_validate_json(self.members["json"])


def iter_tar_samples(tar_path: str | StoragePath) -> Iterator[ShardSample]:
    """Stream a WebDataset tar (a path or URL), grouping consecutive members by key (name up to the first dot)."""
    key: str | None = None
    members: dict[str, bytes] = {}
    with as_path(tar_path).open("rb") as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = info.name.rsplit("/", 1)[-1]
            member_key, _, ext = base.partition(".")
            if member_key != key:
                if key is not None:
                    yield ShardSample(key, members)
                key, members = member_key, {}
            members[ext] = tar.extractfile(info).read()
    if key is not None:
        yield ShardSample(key, members)


def shard_tars(build_dir_or_tars: str | StoragePath | Iterable[str | StoragePath]) -> list[StoragePath]:
    """Tar paths of the finished shards of a build dir, or the given tar paths (paths or URLs) unchanged."""
    if isinstance(build_dir_or_tars, (str, Path)) or hasattr(build_dir_or_tars, "protocol"):
        path = as_path(build_dir_or_tars)
        if path.is_dir():
            return [shard_paths(path, n)[".tar"] for n in finished_shards(path)]
        return [path]
    return [as_path(p) for p in build_dir_or_tars]


def iter_samples(build_dir_or_tars: str | StoragePath | Iterable[str | StoragePath]) -> Iterator[ShardSample]:
    """Raw samples of every finished shard, in shard order."""
    for tar_path in shard_tars(build_dir_or_tars):
        yield from iter_tar_samples(tar_path)


def iter_records(build_dir_or_tars: str | StoragePath | Iterable[str | StoragePath]) -> Iterator[tuple[ImageRecord, bytes]]:
    """Validated ``(record, jpg bytes)`` of every sample; raises ``ShardError`` naming a bad sample."""
    for tar_path in shard_tars(build_dir_or_tars):
        for sample in iter_tar_samples(tar_path):
            missing = {"jpg", "json"} - sample.members.keys()
            if missing:
                raise ShardError(f"{tar_path}: sample {sample.key!r} lacks {sorted(missing)}")
            try:
                record = sample.record()
            except ValueError as exc:
                raise ShardError(f"{tar_path}: sample {sample.key!r} does not validate: {exc}") from exc
            yield record, sample.jpg

