"""Per-shard and per-build manifests as pyarrow schemas (img2dataset-style per-sample status)."""

from __future__ import annotations

import pyarrow as pa
from pydantic import BaseModel, Field

COUNT_FIELDS = ("n_tags", "n_captions", "n_captions_kept", "n_regions", "n_masks", "n_background")

#: One row per input of a shard: ``status`` is ``ok`` or ``error``; ``error`` says why.
SHARD_ROW_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("notes", pa.string()),
        *[pa.field(name, pa.int32(), nullable=False) for name in COUNT_FIELDS],
    ]
)

#: One row per finished shard in ``_manifest.parquet``.
BUILD_MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.string(), nullable=False),
        pa.field("n_inputs", pa.int64(), nullable=False),
        pa.field("n_ok", pa.int64(), nullable=False),
        pa.field("n_error", pa.int64(), nullable=False),
        *[pa.field(name, pa.int64(), nullable=False) for name in COUNT_FIELDS],
    ]
)


class ShardRow(BaseModel):
    key: str
    source_id: str
    status: str = Field(pattern="^(ok|error)$")
    error: str | None = None
    notes: str | None = Field(default=None, description="repairs applied to an ok input (clipped boxes ...)")
    n_tags: int = 0
    n_captions: int = 0
    n_captions_kept: int = 0
    n_regions: int = 0
    n_masks: int = 0
    n_background: int = 0


class ShardStats(BaseModel):
    """Contents of ``NNNNN.stats.json``; its presence marks the shard finished."""

    shard: str
    n_inputs: int
    n_ok: int
    n_error: int
    counts: dict[str, int]
    errors: dict[str, int] = Field(default_factory=dict, description="error reason prefix -> count")
    seconds: float = 0.0
    pipeline_version: str
