"""Turn a ``SourceItem`` into a stored image plus its ground-truth ``ImageRecord``.

Repairs applied to known annotations (each reported in the manifest row's ``notes``):

- EXIF orientation: the image is stored upright; known boxes and masks are rotated with it.
- Boxes partly outside the image are clipped to it; boxes with no area left are dropped.
- Masks (or background masks) whose size differs from the image are dropped (box kept).

Failures that lose the whole input (undecodable or oversized image) raise ``ImageError`` and
become an ``error`` row in the shard.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from data_schemas import ImageLimits, ImageRecord, Mask, Region
from pipeline.filters import clip_boxes_to_image
from pipeline.images import DecodedImage, decode_image, transform_boxes_for_orientation, transform_mask_for_orientation
from pipeline.masks import decode_mask, encode_mask
from pipeline.sources.base import KnownAnnotations, SourceItem


@dataclass
class IngestedItem:
    """A decoded input ready for annotation: the RGB image, the bytes to store and the record so far."""

    decoded: DecodedImage
    record: ImageRecord
    notes: list[str]


def _reorient_mask(mask: Mask, decoded: DecodedImage) -> Mask:
    pixels = transform_mask_for_orientation(decode_mask(mask.rle), decoded.orientation)
    return mask.model_copy(update={"rle": encode_mask(pixels)})


def _fit_regions(regions: list[Region], decoded: DecodedImage, notes: list[str]) -> list[Region]:
    """Rotate with EXIF, clip to the image, drop empty boxes and wrongly sized masks."""
    if not regions:
        return []
    boxes = np.array([r.box_xyxy for r in regions], dtype=np.float64).reshape(-1, 4)
    if decoded.orientation != 1:
        boxes = transform_boxes_for_orientation(boxes, decoded.orientation, decoded.original_size)
    clipped, valid = clip_boxes_to_image(boxes, decoded.width, decoded.height)
    fitted = []
    for region, box, raw, ok in zip(regions, np.asarray(clipped), boxes, np.asarray(valid)):
        if not ok:
            notes.append(f"dropped region {region.id}: box {np.round(raw, 2).tolist()} has no area inside the image")
            continue
        if not np.allclose(box, raw):
            notes.append(f"clipped region {region.id} box {np.round(raw, 2).tolist()} to the image")
        update: dict = {"box_xyxy": tuple(float(v) for v in box)}
        mask = region.mask
        if mask is not None and decoded.orientation != 1:
            mask = _reorient_mask(mask, decoded)
        if mask is not None and tuple(mask.rle.size) != (decoded.height, decoded.width):
            notes.append(f"dropped mask of region {region.id}: size {list(mask.rle.size)} != image")
            mask = None
        update["mask"] = mask
        fitted.append(region.model_copy(update=update))
    return fitted


def _fit_background(known: KnownAnnotations, decoded: DecodedImage, notes: list[str]) -> list:
    kept = []
    for bg in known.background:
        if decoded.orientation != 1:
            pixels = transform_mask_for_orientation(decode_mask(bg.rle), decoded.orientation)
            bg = bg.model_copy(update={"rle": encode_mask(pixels)})
        if tuple(bg.rle.size) != (decoded.height, decoded.width):
            notes.append(f"dropped background {bg.label!r}: mask size {list(bg.rle.size)} != image")
            continue
        kept.append(bg)
    return kept


def ingest_item(item: SourceItem, source_kind: str, limits: ImageLimits) -> IngestedItem:
    """Decode ``item`` and build its record from the annotations that came with it.

    Raises:
        pipeline.images.ImageError: the image can't be used (reason in the message).
        ValueError: the item carries an error from its source (missing image …).
    """
    if item.error is not None or item.image_bytes is None:
        raise ValueError(item.error or "missing_image: source gave no bytes")
    decoded = decode_image(item.image_bytes, limits)
    notes = list(getattr(item.known, "notes", []))
    record = ImageRecord(
        key=item.key,
        source=source_kind,
        source_id=item.source_id,
        width=decoded.width,
        height=decoded.height,
        sha256=hashlib.sha256(decoded.jpg).hexdigest(),
        tags=item.known.tags,
        captions=item.known.captions,
        regions=_fit_regions(item.known.regions, decoded, notes),
        background=_fit_background(item.known, decoded, notes),
        provenance={"source": source_kind} if _has_annotations(item.known) else {},
    )
    return IngestedItem(decoded=decoded, record=record, notes=notes)


def _has_annotations(known: KnownAnnotations) -> bool:
    return bool(known.tags or known.captions or known.regions or known.background)
