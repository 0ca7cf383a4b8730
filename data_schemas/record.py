"""The UMG-41M record: one image with its image-, region- and pixel-level annotations.

A record is what one WebDataset sample's ``json`` member holds (DESIGN.md "Record schema").
Boxes are ``(x1, y1, x2, y2)`` in pixels of the stored (EXIF-corrected) image; masks are COCO
RLE with ``size == [height, width]``.
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PIPELINE_VERSION = "0.1.0"
MAX_KEY_CHARS = 200
KEY_PATTERN = re.compile(r"^[a-z0-9_-]{1,200}$")

Score = Annotated[float, Field(ge=0.0, le=1.0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class Tag(_Strict):
    """An image- or region-level tag (``name``) with its confidence."""

    name: str = Field(min_length=1)
    score: Score = 1.0
    annotator: str


class Caption(_Strict):
    """An image caption; ``kept`` is False when the CLIP-score filter rejected it."""

    text: str = Field(min_length=1)
    annotator: str
    clip_score: float | None = None
    kept: bool = True
    prompt: str | None = Field(default=None, description="the prompt the captioner answered; None: unprompted")


class RegionCaption(_Strict):
    text: str = Field(min_length=1)
    annotator: str
    prompt: str | None = Field(default=None, description="the prompt (with its box) the captioner answered")


class RLE(_Strict):
    """COCO run-length encoding; ``size`` is ``[height, width]``, ``counts`` the compressed string."""

    size: tuple[int, int]
    counts: str


class Mask(_Strict):
    rle: RLE
    stability: float | None = None
    annotator: str


class Region(_Strict):
    """One box with its label, captions, tags and (optional) foreground mask."""

    id: int = Field(ge=0)
    box_xyxy: tuple[float, float, float, float]
    label: str = Field(min_length=1)
    score: Score = 1.0
    annotator: str
    captions: list[RegionCaption] = Field(default_factory=list)
    tags: list[Tag] = Field(default_factory=list)
    mask: Mask | None = None

    @field_validator("box_xyxy")
    @classmethod
    def _box_positive(cls, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        x1, y1, x2, y2 = box
        if not (x2 > x1 and y2 > y1):
            raise ValueError(f"box {list(box)} has x2<=x1 or y2<=y1")
        return box


class BackgroundMask(_Strict):
    """A background ("stuff") segment such as sky or grass."""

    label: str = Field(min_length=1)
    rle: RLE
    score: Score = 1.0
    annotator: str


class ImageRecord(_Strict):
    """The full annotation of one image (the ``json`` member of a shard sample)."""

    key: str
    source: str
    source_id: str
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tags: list[Tag] = Field(default_factory=list)
    captions: list[Caption] = Field(default_factory=list)
    regions: list[Region] = Field(default_factory=list)
    background: list[BackgroundMask] = Field(default_factory=list)
    provenance: dict[str, str] = Field(default_factory=dict)
    pipeline_version: str = PIPELINE_VERSION

    @field_validator("key")
    @classmethod
    def _key_is_sanitised(cls, key: str) -> str:
        if not KEY_PATTERN.match(key):
            raise ValueError(f"key {key!r} is not path-safe ([a-z0-9_-], 1-200 chars); use sanitize_key()")
        return key

    @model_validator(mode="after")
    def _geometry_fits_image(self) -> ImageRecord:
        size = (self.height, self.width)
        ids = [r.id for r in self.regions]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate region ids in {self.key}: {ids}")
        for region in self.regions:
            x1, y1, x2, y2 = region.box_xyxy
            if x1 < 0 or y1 < 0 or x2 > self.width or y2 > self.height:
                raise ValueError(
                    f"region {region.id} box {list(region.box_xyxy)} outside image {self.width}x{self.height}"
                )
            if region.mask is not None and tuple(region.mask.rle.size) != size:
                raise ValueError(f"region {region.id} mask size {list(region.mask.rle.size)} != [h, w] {list(size)}")
        for bg in self.background:
            if tuple(bg.rle.size) != size:
                raise ValueError(f"background {bg.label!r} mask size {list(bg.rle.size)} != [h, w] {list(size)}")
        return self

    def best_caption(self) -> str:
        """The kept caption with the highest CLIP score (first kept one when unscored); '' if none."""
        kept = [c for c in self.captions if c.kept]
        if not kept:
            return ""
        return max(kept, key=lambda c: -1e9 if c.clip_score is None else c.clip_score).text

    def counts(self) -> dict[str, int]:
        """Per-record counts used by manifests and ``umg validate``."""
        return {
            "n_tags": len(self.tags),
            "n_captions": len(self.captions),
            "n_captions_kept": sum(c.kept for c in self.captions),
            "n_regions": len(self.regions),
            "n_masks": sum(r.mask is not None for r in self.regions),
            "n_background": len(self.background),
        }


Status = Literal["ok", "error"]


def sanitize_key(raw: str) -> str:
    """Map a source id to a path-safe shard key: lower case, ``[a-z0-9_-]`` only, at most 200 chars.

    Path separators and dots become ``_``; other characters become ``-``. Distinct ids can collide
    after sanitising; the shard writer rejects duplicates, so a collision is reported, never lost.
    A key longer than 200 characters is shortened deterministically: its first 183 characters, ``-`` and
    16 hex digits of the SHA-1 of the whole key (two long ids sharing a prefix keep distinct keys).
    """
    lowered = raw.strip().lower()
    lowered = re.sub(r"[/\\.:\s]+", "_", lowered)
    cleaned = re.sub(r"[^a-z0-9_-]", "-", lowered).strip("_-")
    if not cleaned:
        raise ValueError(f"source id {raw!r} has no path-safe characters")
    if len(cleaned) <= MAX_KEY_CHARS:
        return cleaned
    digest = hashlib.sha1(cleaned.encode("utf-8", errors="surrogatepass")).hexdigest()[:16]
    return f"{cleaned[:MAX_KEY_CHARS - 17]}-{digest}"
