"""Turn a ``SourceItem`` into a stored image plus its ground-truth ``ImageRecord``.

Repairs applied to known annotations (each reported in the manifest row's ``notes``):

- EXIF orientation: the image is stored upright; known boxes and masks are rotated with it.
- Boxes partly outside the image are clipped to it; boxes with no area left are dropped.
- Masks (or background masks) whose size differs from the image are dropped (box kept).

Failures that lose the whole input (undecodable or oversized image) raise ``ImageError`` and
become an ``error`` row in the shard.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import numpy as np

from data_schemas import ImageLimits, ImageRecord, Region
from pipeline.filters import clip_boxes_to_image
from pipeline.images import DecodedImage, decode_image, transform_known_for_orientation
from pipeline.sources.base import KnownAnnotations, SourceItem


@dataclass
class IngestedItem:
    """A decoded input ready for annotation: the RGB image, the bytes to store and the record so far.

    ``error`` is set when an annotation stage failed on this image (it then becomes an error row);
    ``scratch`` carries intermediate stage outputs (raw detections, unfiltered masks) between stages;
    ``skip_models`` says why no model stage takes this image (``model_fit``), None when they all do.
    """

    decoded: DecodedImage
    record: ImageRecord
    notes: list[str]
    error: str | None = None
    scratch: dict = field(default_factory=dict)
    skip_models: str | None = None


def model_fit(width: int, height: int, limits: ImageLimits) -> str | None:
    """Why the model stages must not take a ``width`` x ``height`` image, or None when they can.

    Decoding allows up to ``images.max_pixels`` (a stored image); a model stage's buffers (resized copies,
    per-region masks at full size) grow with the pixels, and its resizing to a fixed short side rounds the other
    side of an extreme strip (16000×1) to 0. Such an image is stored with its known annotations and this note.
    """
    if width * height > limits.max_model_pixels:
        return (f"models_skipped: {width}x{height} = {width * height} pixels is over "
                f"images.max_model_pixels={limits.max_model_pixels}; stored with known annotations only")
    aspect = max(width, height) / min(width, height)
    if aspect > limits.max_model_aspect:
        return (f"models_skipped: aspect ratio {width}x{height} ({aspect:.0f}:1) is over "
                f"images.max_model_aspect={limits.max_model_aspect:g}; stored with known annotations only")
    return None


def _fit_regions(regions: list[Region], decoded: DecodedImage, notes: list[str]) -> list[Region]:
    """Clip upright boxes to the image and drop boxes with no area left."""
    if not regions:
        return []
    boxes = np.array([r.box_xyxy for r in regions], dtype=np.float64).reshape(-1, 4)
    clipped, valid = clip_boxes_to_image(boxes, decoded.width, decoded.height)
    fitted = []
    for region, box, raw, ok in zip(regions, np.asarray(clipped), boxes, np.asarray(valid)):
        if not ok:
            notes.append(f"dropped region {region.id}: box {np.round(raw, 2).tolist()} has no area inside the image")
            continue
        if not np.allclose(box, raw):
            notes.append(f"clipped region {region.id} box {np.round(raw, 2).tolist()} to the image")
        fitted.append(region.model_copy(update={"box_xyxy": tuple(float(v) for v in box)}))
    return fitted


def _drop_misfit_masks(known: KnownAnnotations, size_wh: tuple[int, int], notes: list[str]) -> KnownAnnotations:
    """``known`` without the region / background masks whose size is not the stored image's ``(w, h)``.

    Runs before the EXIF transform, which decodes every mask: a mask claiming a huge size is dropped
    here, never decoded.
    """
    size_hw = (size_wh[1], size_wh[0])
    regions = []
    for region in known.regions:
        if region.mask is not None and tuple(region.mask.rle.size) != size_hw:
            notes.append(f"dropped mask of region {region.id}: size {list(region.mask.rle.size)} != image")
            region = region.model_copy(update={"mask": None})
        regions.append(region)
    background = []
    for bg in known.background:
        if tuple(bg.rle.size) != size_hw:
            notes.append(f"dropped background {bg.label!r}: mask size {list(bg.rle.size)} != image")
            continue
        background.append(bg)
    return dataclasses.replace(known, regions=regions, background=background, notes=[])


def ingest_item(item: SourceItem, source_kind: str, limits: ImageLimits) -> IngestedItem:
    """Decode ``item`` and build its record from the annotations that came with it.

    Raises:
        pipeline.images.ImageError: the image can't be used (reason in the message).
        ValueError: the item carries an error from its source (missing image …).
    """
    if item.error is not None or item.image_bytes is None:
        raise ValueError(item.error or "missing_image: source gave no bytes")
    decoded = decode_image(item.image_bytes, limits)
    notes = list(item.known.notes)
    known = _drop_misfit_masks(item.known, decoded.original_size, notes)
    if decoded.orientation != 1:
        known = transform_known_for_orientation(known, decoded.orientation, decoded.original_size)
    record = ImageRecord(
        key=item.key,
        source=source_kind,
        source_id=item.source_id,
        width=decoded.width,
        height=decoded.height,
        sha256=hashlib.sha256(decoded.jpg).hexdigest(),
        tags=known.tags,
        captions=known.captions,
        regions=_fit_regions(known.regions, decoded, notes),
        background=known.background,
        provenance={"source": source_kind} if _has_annotations(known) else {},
    )
    skip = model_fit(decoded.width, decoded.height, limits)
    return IngestedItem(decoded=decoded, record=record, notes=notes + ([skip] if skip else []), skip_models=skip)


def _has_annotations(known: KnownAnnotations) -> bool:
    return bool(known.tags or known.captions or known.regions or known.background)
