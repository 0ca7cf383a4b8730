"""Which state of a build was announced as complete (``_completed.json``), so a rerun does not announce it again.

The build flow emits ``umg.build.completed`` (the event training triggers on) once per *content* of a build:
``build_fingerprint`` hashes the finished shards' manifest rows (inputs, ok, errors, counts per shard). A rerun of
a finished build finds the same fingerprint in ``_completed.json`` and stays silent; a build whose shards changed
since (``--retry-errors`` rebuilt error rows) has a new fingerprint and is announced again. The record is written
after the event, so a crash between the two announces twice rather than never.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline.shards import finished_shards, read_stats
from pipeline.storage import StoragePath, as_path, write_bytes_whole

COMPLETED_NAME = "_completed.json"


def build_fingerprint(build_dir: str | Path) -> str:
    """sha256 of the finished shards' names and counts (not their timings): equal for equal shard contents."""
    digest = hashlib.sha256()
    for name in finished_shards(build_dir):
        stats = read_stats(build_dir, name)
        digest.update(json.dumps([name, stats.n_inputs, stats.n_ok, stats.n_error, stats.counts, stats.errors],
                                 sort_keys=True).encode("utf-8"))
    return digest.hexdigest()


def read_completion(build_dir: str | Path) -> dict[str, Any] | None:
    """The last announcement of ``build_dir`` (``fingerprint``, ``run``, ...), or None."""
    path = as_path(build_dir) / COMPLETED_NAME
    return json.loads(path.read_text("utf-8")) if path.exists() else None


def already_announced(build_dir: str | Path) -> bool:
    """True when the build's current content was announced before."""
    previous = read_completion(build_dir)
    return previous is not None and previous.get("fingerprint") == build_fingerprint(build_dir)


def record_completion(build_dir: str | Path, **details: Any) -> StoragePath:
    """Write ``_completed.json`` (whole) with the current fingerprint and ``details`` (run id, counts)."""
    path = as_path(build_dir) / COMPLETED_NAME
    record = json.dumps({"fingerprint": build_fingerprint(build_dir), **details}, sort_keys=True)
    write_bytes_whole(path, record.encode("utf-8"))
    return path
