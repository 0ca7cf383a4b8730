"""The source protocol: a deterministic list of input refs, read back as ``SourceItem``s.

A source lists its inputs as sorted, stable string refs (``list_refs``); the build plans input
shards by slicing that list (``plan_shards``), so shard *i* always holds the same inputs and a
rerun can skip finished shards. ``read(refs)`` yields exactly one ``SourceItem`` per ref, in order:
an input that cannot be read (missing image, unreadable file, or refused by ``confine``: outside the
input root, not a regular file, over its size cap) is yielded with ``error`` set instead of raising, so
it becomes an error row and nothing else in the shard is lost. Everything a source enumerates is a ref:
duplicates, orphans and malformed entries get refs of their own that read as error items.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from data_schemas import BackgroundMask, Caption, Region, Tag


@dataclass
class KnownAnnotations:
    """Annotations that came with the input (COCO boxes/masks/captions, VG regions, alt text).

    Region ids are assigned by the source, unique per image. Pixel geometry refers to the image
    as stored in the source file *before* EXIF rotation; ``pipeline.images`` maps it when it rotates.
    ``notes`` lists repairs/skips the source made (e.g. a zero-width box it dropped); they end up in
    the shard row's ``notes`` column and never make the input an error.
    """

    tags: list[Tag] = field(default_factory=list)
    captions: list[Caption] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)
    background: list[BackgroundMask] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class SourceItem:
    """One input: ``key`` is already sanitised; ``image_bytes`` is None exactly when ``error`` is set."""

    key: str
    source_id: str
    image_bytes: bytes | None
    known: KnownAnnotations = field(default_factory=KnownAnnotations)
    error: str | None = None


def printable_id(source_id: str) -> str:
    """``source_id`` as valid UTF-8: bytes of a file or member name that were not UTF-8 (``os`` and ``tarfile``
    keep them as surrogate escapes, which parquet and JSON cannot store) are written ``\\xNN``, another lone
    surrogate ``\\uNNNN``.

    >>> printable_id(b"caf\\xe9.jpg".decode("utf-8", "surrogateescape"))
    'caf\\\\xe9.jpg'
    """
    try:
        source_id.encode("utf-8")
        return source_id
    except UnicodeEncodeError:
        pass
    try:
        return source_id.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte (from a JSON "\\ud800")
        return source_id.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class InputShard:
    """A unit of work: shard ``shard_id`` holds ``refs`` (a slice of the source's sorted refs)."""

    shard_id: int
    refs: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.shard_id:05d}"


@runtime_checkable
class Source(Protocol):
    """Contract every reader in ``pipeline.sources`` implements."""

    kind: str

    def list_refs(self) -> list[str]:
        """Sorted, stable refs of every input (cheap: no image decoding)."""
        ...

    def read(self, refs: Sequence[str]) -> Iterator[SourceItem]:
        """Yield exactly one item per ref, in the order given; failures become ``error`` items."""
        ...


def plan_shards(refs: Sequence[str], shard_size: int) -> list[InputShard]:
    """Slice ``refs`` into consecutive shards of ``shard_size`` (the last may be shorter)."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    return [
        InputShard(shard_id=i // shard_size, refs=tuple(refs[i : i + shard_size]))
        for i in range(0, len(refs), shard_size)
    ]
