"""Readers that turn raw collections into ``SourceItem``s (see ``pipeline.sources.base``)."""

from pipeline.sources.base import InputShard, KnownAnnotations, Source, SourceItem, plan_shards

__all__ = ["InputShard", "KnownAnnotations", "Source", "SourceItem", "plan_shards"]
