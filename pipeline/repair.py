"""Rebuild the error rows of a finished build that a rerun may fix (``umg build --retry-errors``).

An error row of an infrastructure kind (``pipeline.breaker.is_infrastructure_error``: an annotator or internal
failure, e.g. a CUDA fault on a few images) is not the input's fault. ``repair_shard`` writes a new version of
its shard: the ``ok`` samples and the other error rows are carried over unchanged (no model runs on them), the
retryable inputs are read, ingested and annotated again. The new version replaces the old one whole: the old
``stats.json`` and tar are removed just before the commit, so a crash in between leaves the shard unfinished
and the next run rebuilds it from its inputs — every input still has exactly one row.
"""

from __future__ import annotations

import logging
from pathlib import Path

from data_schemas import ImageLimits, ShardRow, ShardStats
from data_schemas.config import BreakerConfig
from pipeline.breaker import is_infrastructure_error
from pipeline.key_ledger import KeyLedger
from pipeline.shard_build import Annotate, fill_shard
from pipeline.shards import ShardError, ShardWriter, finished_shards, iter_tar_samples, read_shard_rows, shard_paths
from pipeline.sources.base import InputShard, Source
from pipeline.storage import as_path

log = logging.getLogger(__name__)


def retryable_keys(build_dir: str | Path, name: str) -> set[str]:
    """Keys of shard ``name``'s error rows of an infrastructure kind."""
    return {row["key"] for row in read_shard_rows(build_dir, name)
            if row["status"] == "error" and is_infrastructure_error(row["error"])}


def shards_to_repair(build_dir: str | Path, plan: list[InputShard]) -> list[InputShard]:
    """The finished shards of ``plan`` holding at least one retryable error row."""
    done = set(finished_shards(build_dir))
    return [shard for shard in plan if shard.name in done and retryable_keys(build_dir, shard.name)]


def repair_shard(
    source: Source,
    shard: InputShard,
    build_dir: Path,
    limits: ImageLimits,
    keys: KeyLedger,
    annotate: Annotate | None = None,
    breaker: BreakerConfig | None = None,
) -> ShardStats:
    """A new version of finished shard ``shard`` with its retryable error rows built again (see module doc)."""
    build_dir = as_path(build_dir)
    retry = retryable_keys(build_dir, shard.name)
    rows = [ShardRow(**row) for row in read_shard_rows(build_dir, shard.name)]
    ok_rows = {row.key: row for row in rows if row.status == "ok"}
    paths = shard_paths(build_dir, shard.name)
    with ShardWriter(build_dir, shard.name, taken_keys=set()) as writer:
        for sample in iter_tar_samples(paths[".tar"]):
            writer.copy(sample, ok_rows.pop(sample.key))
        if ok_rows:
            raise ShardError(f"shard {shard.name}: rows {sorted(ok_rows)[:5]} are ok but missing from its tar")
        for row in rows:
            if row.status == "error" and row.key not in retry:
                writer.write_error(row.key, row.source_id, row.error or "")
        items = (item for item in source.read(shard.refs) if item.key in retry)
        n_read = fill_shard(writer, source, items, limits, keys, annotate, breaker)
        if n_read != len(retry):
            raise ShardError(f"shard {shard.name}: {len(retry)} error rows to retry but the source gave {n_read}")
        for suffix in (".stats.json", ".tar"):  # unfinished from here until the commit
            paths[suffix].unlink()
        stats = writer.commit()
    log.info("shard %s: rebuilt %d error rows, %d now ok", shard.name, len(retry), stats.n_ok)
    return stats
