"""Records, manifests and configs shared by every stage. Imports nothing of ours."""

from data_schemas.config import (
    AnnotateConfig,
    BuildConfig,
    ConfigError,
    ImageLimits,
    MergeConfig,
    SourceConfig,
    StabilityConfig,
    load_config,
)
from data_schemas.manifest import BUILD_MANIFEST_SCHEMA, COUNT_FIELDS, SHARD_ROW_SCHEMA, ShardRow, ShardStats
from data_schemas.record import (
    KEY_PATTERN,
    PIPELINE_VERSION,
    RLE,
    BackgroundMask,
    Caption,
    ImageRecord,
    Mask,
    Region,
    RegionCaption,
    Tag,
    sanitize_key,
)
from data_schemas.train_config import TrainConfig

__all__ = [
    "AnnotateConfig",
    "MergeConfig",
    "StabilityConfig",
    "BUILD_MANIFEST_SCHEMA",
    "COUNT_FIELDS",
    "KEY_PATTERN",
    "PIPELINE_VERSION",
    "RLE",
    "SHARD_ROW_SCHEMA",
    "BackgroundMask",
    "BuildConfig",
    "ConfigError",
    "SourceConfig",
    "Caption",
    "ImageLimits",
    "ImageRecord",
    "Mask",
    "Region",
    "RegionCaption",
    "ShardRow",
    "ShardStats",
    "Tag",
    "TrainConfig",
    "load_config",
    "sanitize_key",
]
