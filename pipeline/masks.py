"""Binary masks as COCO RLE, and the geometry the filters need (area, box, IoU).

Conventions used throughout:

* A mask array is a numpy ``bool`` array of shape ``(H, W)``; a batch is ``(N, H, W)``.
* An :class:`~data_schemas.RLE` holds ``size == [H, W]`` and the compressed ``counts`` as ``str``
  (pycocotools produces ``bytes``; ``str`` is what the JSON record stores).
* Boxes are ``(x1, y1, x2, y2)`` in pixels with an *exclusive* right/bottom edge: a mask whose
  pixels span columns ``c0..c1`` and rows ``r0..r1`` has the box ``(c0, r0, c1 + 1, r1 + 1)``.
  This is pycocotools' ``toBbox`` (``x, y, w, h`` with ``w = c1 - c0 + 1``) turned into xyxy, and
  it makes box width × height equal the pixel extent, the same convention as ``Region.box_xyxy``.

Pure functions: no I/O, no models.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from data_schemas import RLE

__all__ = ["check_mask_size", "check_rle", "decode_mask", "encode_mask", "mask_area", "mask_bbox_xyxy", "mask_iou", "rle_string_counts"]

RLELike = RLE | Mapping[str, Any]
#: pycocotools keeps runs and ``h * w`` in 32-bit unsigned ints (and polygon rasters in ``int``).
MAX_MASK_PIXELS = 2**31 - 1
_MAX_DIGITS = 7  # 7 x 5 bits covers any 32-bit run


def rle_string_counts(counts: str) -> list[int]:
    """The run lengths of a compressed COCO RLE string, decoded as pycocotools' ``rleFrString`` does.

    pycocotools decodes without bounds checks: a character outside ``'0'..'o'`` or a number cut short
    makes it read past the string. This decoder refuses those instead.

    Raises:
        ValueError: a character outside the alphabet, a number cut short or longer than 7 characters.
    """
    runs: list[int] = []
    pos = 0
    while pos < len(counts):
        value, digits, more = 0, 0, True
        while more:
            if pos >= len(counts):
                raise ValueError("RLE counts string ends inside a number")
            code = ord(counts[pos]) - 48
            if not 0 <= code < 64:
                raise ValueError(f"RLE counts has character {counts[pos]!r} outside '0'..'o'")
            value |= (code & 0x1F) << (5 * digits)
            more = bool(code & 0x20)
            pos, digits = pos + 1, digits + 1
            if digits > _MAX_DIGITS:
                raise ValueError("RLE counts has a number longer than 7 characters")
            if not more and code & 0x10:
                value |= -1 << (5 * digits)
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value & 0xFFFFFFFF)  # the C decoder's (uint) cast
    return runs


def check_rle(size: Any, counts: str | list[Any]) -> tuple[int, int]:
    """Validate an RLE before pycocotools touches it; returns ``(h, w)``.

    ``counts`` is the compressed string or the uncompressed list of runs. The runs must be non-negative
    32-bit ints covering exactly ``h * w`` pixels: pycocotools' decoder writes ``sum(runs)`` pixels into an
    ``h * w`` buffer without checking, so a longer RLE is a heap overflow, not an exception.

    Raises:
        ValueError: naming what is wrong (size, a run, the total).
    """
    h, w = check_mask_size(size)
    if isinstance(counts, str):
        runs = rle_string_counts(counts)
    elif isinstance(counts, list) and all(_is_int(v) and 0 <= v <= 0xFFFFFFFF for v in counts):
        runs = [int(v) for v in counts]
    else:
        raise ValueError("RLE counts is neither a string nor a list of non-negative 32-bit ints")
    if not runs or sum(runs) != h * w:
        raise ValueError(f"RLE runs cover {sum(runs)} pixels, not h*w = {h * w}")
    return h, w


def check_mask_size(size: Any) -> tuple[int, int]:
    """``(h, w)`` of a mask size ``[h, w]``: positive ints, at most ``MAX_MASK_PIXELS`` pixels.

    Raises:
        ValueError: anything else.
    """
    if not (isinstance(size, list | tuple) and len(size) == 2 and all(_is_int(v) for v in size)):
        raise ValueError(f"mask size {size!r} is not [h, w] of ints")
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0 or h * w > MAX_MASK_PIXELS:
        raise ValueError(f"mask size [{h}, {w}] is empty or over {MAX_MASK_PIXELS} pixels")
    return h, w


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _require_bool(masks: np.ndarray, ndim: int, name: str) -> np.ndarray:
    # Strict dtype: silently thresholding float logits or uint8 {0, 255} masks would hide bugs upstream.
    masks = np.asarray(masks)
    if masks.dtype != np.bool_:
        raise TypeError(f"{name} must be a bool array, got dtype {masks.dtype}")
    if masks.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {masks.shape}")
    return masks


def _to_coco(rle: RLELike) -> dict[str, Any]:
    """An RLE (model or dict with ``size``/``counts``) as the dict pycocotools wants (``counts`` bytes)."""
    if isinstance(rle, RLE):
        size, counts = rle.size, rle.counts
    else:
        size, counts = rle["size"], rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": [int(size[0]), int(size[1])], "counts": counts}


def encode_mask(mask: np.ndarray) -> RLE:
    """Encode a binary mask as compressed COCO RLE.

    Args:
        mask: ``(H, W)`` bool array.

    Returns:
        RLE with ``size == (H, W)`` and ``counts`` as an ASCII ``str``.
    """
    mask = _require_bool(mask, 2, "mask")
    encoded = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return RLE(size=(int(encoded["size"][0]), int(encoded["size"][1])), counts=encoded["counts"].decode("ascii"))


def decode_mask(rle: RLELike) -> np.ndarray:
    """Decode a COCO RLE (``RLE`` model or ``{"size", "counts"}`` dict) to a ``(H, W)`` bool array."""
    return mask_utils.decode(_to_coco(rle)).astype(bool)


def mask_area(rle: RLELike) -> int:
    """Number of foreground pixels of an RLE mask (computed on the RLE, without decoding)."""
    return int(mask_utils.area(_to_coco(rle)))


def mask_bbox_xyxy(mask: RLELike | np.ndarray) -> np.ndarray:
    """Tight box around the foreground of a mask, ``x2``/``y2`` exclusive (last column/row + 1).

    Args:
        mask: an RLE (model or dict) or a ``(H, W)`` bool array; both give the same box.

    Returns:
        ``(4,)`` float64 array ``(x1, y1, x2, y2)``; all zeros for an empty mask (check the area first).
    """
    if isinstance(mask, np.ndarray):
        return _array_bbox_xyxy(_require_bool(mask, 2, "mask"))
    x, y, w, h = mask_utils.toBbox(_to_coco(mask))
    return np.array([x, y, x + w, y + h], dtype=np.float64)


def _array_bbox_xyxy(mask: np.ndarray) -> np.ndarray:
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    if cols.size == 0:
        return np.zeros(4, dtype=np.float64)
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float64)


def mask_iou(masks_a: np.ndarray, masks_b: np.ndarray) -> np.ndarray:
    """Intersection over union of pairwise-aligned masks: ``iou[i] = IoU(masks_a[i], masks_b[i])``.

    Both masks empty (empty union) gives IoU ``0.0``, not 1.0 or NaN: an empty mask carries no
    annotation, so the stability filter should never rate it as stable.

    Args:
        masks_a: ``(N, H, W)`` bool array.
        masks_b: ``(N, H, W)`` bool array, same shape.

    Returns:
        ``(N,)`` float64 array in ``[0, 1]``.
    """
    masks_a = _require_bool(masks_a, 3, "masks_a")
    masks_b = _require_bool(masks_b, 3, "masks_b")
    if masks_a.shape != masks_b.shape:
        raise ValueError(f"mask batches differ in shape: {masks_a.shape} vs {masks_b.shape}")
    n, height, width = masks_a.shape
    flat_a, flat_b = masks_a.reshape(n, height * width), masks_b.reshape(n, height * width)
    inter = np.logical_and(flat_a, flat_b).sum(axis=1, dtype=np.int64)
    union = np.logical_or(flat_a, flat_b).sum(axis=1, dtype=np.int64)
    iou = np.zeros(n, dtype=np.float64)
    np.divide(inter, union, out=iou, where=union > 0)
    return iou
