"""Image decoding with guards, and EXIF-orientation maps for known annotations.

``decode_image`` turns raw input bytes into the RGB image a shard stores. Every way an input can be
bad becomes an ``ImageError`` whose message starts with a stable tag (``REASON_TAGS``), so shard
stats can count errors by ``reason.split(":")[0]``. Pixel geometry that came with an input (COCO
boxes, masks) refers to the image as stored *before* EXIF rotation; ``transform_boxes_for_orientation``,
``transform_mask_for_orientation`` (and ``transform_known_for_orientation`` for a whole
``KnownAnnotations``) move it to the upright image.

Orientation codes follow EXIF tag 0x0112 and ``PIL.ImageOps.exif_transpose``: 1 none, 2 mirror
left-right, 3 rotate 180, 4 mirror top-bottom, 5 transpose, 6 rotate 90 clockwise, 7 transverse,
8 rotate 90 counter-clockwise.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_schemas import RLE, ImageLimits
from pipeline.masks import decode_mask, encode_mask
from pipeline.sources.base import KnownAnnotations

REASON_TAGS = ("empty", "not_an_image", "truncated", "too_large", "corrupt", "unsupported_mode")
EXIF_ORIENTATION_TAG = 0x0112

# EXIF orientation -> PIL transpose that displays the image upright (same table as ImageOps.exif_transpose).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Unambiguous magic numbers (JPEG, PNG, GIF, TIFF; WebP is checked at offset 8): an unidentifiable file
# starting with one was cut inside its header. BMP's 2-byte "BM" is left out: plain text can start so.
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")
# Exceptions PIL plugins raise on malformed data (besides OSError); anything else is a real bug.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError, ZeroDivisionError)


# Pillow formats that are not decoded here: EPS/PS runs Ghostscript (a subprocess on untrusted bytes); the others
# are stubs that need an external handler (BUFR, GRIB, HDF5, WMF/EMF) or read no pixels (MPEG, IPTC).
NOT_DECODED = frozenset({"EPS", "BUFR", "GRIB", "HDF5", "WMF", "MPEG", "IPTC"})
try:  # HEIC/HEIF where the plugin is installed (optional: pip install pillow-heif)
    from pillow_heif import register_heif_opener

    register_heif_opener()
except ImportError:
    pass


def decodable_formats() -> list[str]:
    """Pillow format names ``decode_image`` opens: every registered reader except ``NOT_DECODED``."""
    Image.init()
    return [fmt for fmt in Image.OPEN if fmt not in NOT_DECODED]


def decodable_extensions() -> frozenset[str]:
    """File extensions (lower case, with the dot: ``.jfif``, ``.avif`` …) of the formats ``decode_image`` opens."""
    Image.init()
    formats = set(decodable_formats()) | {"MPO"}  # .mpo files open through the JPEG reader
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in formats)


class ImageError(ValueError):
    """An input that cannot become a stored image; ``reason`` starts with one of ``REASON_TAGS``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class DecodedImage:
    """A decoded input.

    Attributes:
        image: PIL image, mode RGB, EXIF orientation applied; size ``(width, height)``.
        width, height: of ``image`` in pixels.
        jpg: bytes to store — the input itself when it already is a baseline RGB JPEG that needs no
            rotation, else ``image`` re-encoded as JPEG at ``ImageLimits.jpeg_quality``.
        orientation: EXIF orientation of the input (1 = none; invalid values are treated as 1).
        original_size: ``(width, height)`` as stored in the file, before the orientation transpose.
    """

    image: Image.Image
    width: int
    height: int
    jpg: bytes
    orientation: int
    original_size: tuple[int, int]


def decode_image(data: bytes, limits: ImageLimits) -> DecodedImage:
    """Decode ``data`` to an upright RGB image, refusing oversized images before any pixel is decoded.

    Raises:
        ImageError: ``empty:``, ``not_an_image:``, ``truncated:``, ``too_large:``, ``corrupt:`` or
            ``unsupported_mode:`` followed by a short explanation.
    """
    if not data:
        raise ImageError("empty: zero-byte file")
    # PIL's own decompression-bomb guard warns/raises from open() and from load() of some formats.
    # Turning the warning into an error only inside this block leaves PIL's global limit untouched;
    # warnings.catch_warnings is process-wide, so do not call this from several threads at once.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = _open(data)
            _check_size(im.size, limits)
            im.load()
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(_pil_bomb_reason(data, exc, limits)) from exc
        except _DECODE_ERRORS as exc:
            raise ImageError(_load_error_reason(exc)) from exc
    orientation = _orientation(im)
    original_size = im.size
    rgb = to_rgb(im)
    if orientation != 1:
        rgb = rgb.transpose(_TRANSPOSE[orientation])
    if _can_keep_bytes(im, orientation):
        jpg = data
    else:
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=limits.jpeg_quality)
        jpg = buf.getvalue()
    return DecodedImage(rgb, rgb.width, rgb.height, jpg, orientation, original_size)


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=_FORMATS)
    except UnidentifiedImageError as exc:
        if data.startswith(_SIGNATURES) or data[8:12] == b"WEBP":
            raise ImageError("truncated: image header is incomplete") from exc
        raise ImageError("not_an_image: cannot identify image file") from exc


_FORMATS = decodable_formats()


def _check_size(size: tuple[int, int], limits: ImageLimits) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"corrupt: image size {width}x{height} is empty")
    if width * height > limits.max_pixels:
        raise ImageError(
            f"too_large: {width}x{height} = {width * height} pixels exceeds images.max_pixels={limits.max_pixels}"
        )
    if max(width, height) > limits.max_side:
        raise ImageError(f"too_large: side {max(width, height)} exceeds images.max_side={limits.max_side}")


def _pil_bomb_reason(data: bytes, exc: Exception, limits: ImageLimits) -> str:
    """Reason for PIL's bomb guard firing: our own size message when the header gives the size."""
    size = header_size(data)
    if size is not None:
        try:
            _check_size(size, limits)
        except ImageError as ours:
            return ours.reason
        w, h = size
        return (
            f"too_large: {w}x{h} = {w * h} pixels exceeds PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS} "
            "(PIL decompression-bomb guard; raise it in the worker to allow larger images)"
        )
    return f"too_large: {exc} (PIL decompression-bomb guard)"


def header_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` read from the header alone by PIL's format plugins, bypassing the bomb check.

    Returns None when no plugin recognises the header.
    """
    Image.init()
    prefix = data[:16]
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:
            if accept and not accept(prefix):
                continue
            return tuple(factory(io.BytesIO(data), "").size)  # type: ignore[return-value]
        except Exception:  # noqa: BLE001 - any plugin failure just means "not this format"
            continue
    return None


def _load_error_reason(exc: Exception) -> str:
    message = str(exc) or type(exc).__name__
    if isinstance(exc, EOFError) or "truncat" in message.lower():
        return "truncated: image file is truncated"
    return f"corrupt: {message}"


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except _DECODE_ERRORS:
        return 1  # unreadable EXIF block: treat as upright rather than reject the pixels
    if isinstance(value, int) and value in _TRANSPOSE:
        return value
    return 1


def _can_keep_bytes(im: Image.Image, orientation: int) -> bool:
    return im.format == "JPEG" and im.mode == "RGB" and orientation == 1 and not im.info.get("progressive")


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha composited on white, 16/32-bit scaled (not clipped) to 8 bit.

    Raises:
        ImageError: ``unsupported_mode:`` when PIL cannot convert the mode.
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I") or mode == "F":
        nominal_max = 65535.0 if mode.startswith("I;16") else None
        return Image.fromarray(_scale_to_uint8(np.asarray(im), nominal_max)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as exc:
        raise ImageError(f"unsupported_mode: cannot convert mode {mode} to RGB") from exc


def _scale_to_uint8(values: np.ndarray, nominal_max: float | None) -> np.ndarray:
    """Map a high-bit-depth single-channel array (H, W) to uint8 (H, W) by its nominal range.

    With ``nominal_max`` (65535 for PIL's ``I;16*`` modes) values are scaled by ``255 / nominal_max``.
    Without it (modes ``I``, ``F``) the range is inferred: floats in [0, 1] are scaled by 255, values
    in [0, 255] kept, values in [0, 65535] treated as 16 bit, anything else min-max stretched.
    """
    is_float = values.dtype.kind == "f"
    values = values.astype(np.float64)
    lo, hi = float(values.min()), float(values.max())
    if nominal_max is not None:
        scaled = values * (255.0 / nominal_max)
    elif is_float and lo >= 0.0 and hi <= 1.0:
        scaled = values * 255.0
    elif lo >= 0 and hi <= 255:
        scaled = values
    elif lo >= 0 and hi <= 65535:
        scaled = values / 257.0
    else:
        scaled = (values - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# Where a point (x, y) of the stored image lands after the upright transpose; (W, H) = stored size.
_POINT_MAPS: dict[int, Callable[[np.ndarray, np.ndarray, int, int], tuple[np.ndarray, np.ndarray]]] = {
    1: lambda x, y, w, h: (x, y),
    2: lambda x, y, w, h: (w - x, y),
    3: lambda x, y, w, h: (w - x, h - y),
    4: lambda x, y, w, h: (x, h - y),
    5: lambda x, y, w, h: (y, x),
    6: lambda x, y, w, h: (h - y, x),
    7: lambda x, y, w, h: (h - y, w - x),
    8: lambda x, y, w, h: (y, w - x),
}
_MASK_MAPS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda m: m,
    2: lambda m: m[:, ::-1],
    3: lambda m: m[::-1, ::-1],
    4: lambda m: m[::-1, :],
    5: lambda m: m.T,
    6: lambda m: np.rot90(m, -1),
    7: lambda m: m[::-1, ::-1].T,
    8: lambda m: np.rot90(m, 1),
}


def _check_orientation(orientation: int) -> None:
    if orientation not in _POINT_MAPS:
        raise ValueError(f"EXIF orientation must be 1..8, got {orientation}")


def transform_boxes_for_orientation(
    boxes_xyxy: np.ndarray, orientation: int, original_size: tuple[int, int]
) -> np.ndarray:
    """Move boxes from stored-pixel coordinates to the upright (EXIF-transposed) image.

    Args:
        boxes_xyxy: (N, 4) float ``x1, y1, x2, y2`` in pixels of the image as stored in the file.
        orientation: EXIF orientation 1..8 (``DecodedImage.orientation``).
        original_size: ``(width, height)`` as stored (``DecodedImage.original_size``).

    Returns:
        (N, 4) float64 boxes in pixels of the upright image, still with x1 <= x2 and y1 <= y2.
    """
    _check_orientation(orientation)
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    w, h = original_size
    xa, ya = _POINT_MAPS[orientation](boxes[:, 0], boxes[:, 1], w, h)
    xb, yb = _POINT_MAPS[orientation](boxes[:, 2], boxes[:, 3], w, h)
    return np.stack([np.minimum(xa, xb), np.minimum(ya, yb), np.maximum(xa, xb), np.maximum(ya, yb)], axis=1)


def transform_mask_for_orientation(mask: np.ndarray, orientation: int) -> np.ndarray:
    """Move an (H, W) mask of the stored image to the upright image; returns a contiguous array.

    For orientations 5..8 the result is (W, H).
    """
    _check_orientation(orientation)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    return np.ascontiguousarray(_MASK_MAPS[orientation](mask))


def transform_rle_for_orientation(rle: RLE, orientation: int) -> RLE:
    """Same as ``transform_mask_for_orientation`` for a COCO RLE (``size`` = [h, w])."""
    if orientation == 1:
        return rle
    return encode_mask(transform_mask_for_orientation(decode_mask(rle), orientation))


def transform_known_for_orientation(
    known: KnownAnnotations, orientation: int, original_size: tuple[int, int]
) -> KnownAnnotations:
    """A copy of ``known`` with region boxes, region masks and background masks moved to the upright image.

    Tags, captions and notes are copied unchanged. ``original_size`` is ``(width, height)`` as stored.
    """
    _check_orientation(orientation)
    regions = []
    for region in known.regions:
        box = transform_boxes_for_orientation(np.array([region.box_xyxy]), orientation, original_size)[0]
        update: dict[str, Any] = {"box_xyxy": tuple(float(v) for v in box)}
        if region.mask is not None:
            rle = transform_rle_for_orientation(region.mask.rle, orientation)
            update["mask"] = region.mask.model_copy(update={"rle": rle})
        regions.append(region.model_copy(update=update))
    background = [
        bg.model_copy(update={"rle": transform_rle_for_orientation(bg.rle, orientation)}) for bg in known.background
    ]
    return KnownAnnotations(
        tags=list(known.tags),
        captions=list(known.captions),
        regions=regions,
        background=background,
        notes=list(known.notes),
    )
