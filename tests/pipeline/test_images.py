"""pipeline.images: decode guards, mode conversion, EXIF orientation and annotation transforms."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

from data_schemas import RLE, BackgroundMask, ImageLimits, Mask, Region
from pipeline.images import (
    ImageError,
    decode_image,
    transform_boxes_for_orientation,
    transform_known_for_orientation,
    transform_mask_for_orientation,
    transform_rle_for_orientation,
)
from pipeline.sources.base import KnownAnnotations

LIMITS = ImageLimits()
# PIL.Image.transpose method per EXIF orientation (1 = identity), as ImageOps.exif_transpose uses.
TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature + IHDR (8-bit RGB) + IEND and no pixel data: any size for a few bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def noisy_rgb(width: int = 64, height: int = 48) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def with_exif(im: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, fmt, exif=exif)


def assert_stored_jpeg_is_rgb(decoded) -> None:
    stored = Image.open(io.BytesIO(decoded.jpg))
    assert stored.format == "JPEG" and stored.mode == "RGB"
    assert stored.size == (decoded.width, decoded.height)


# --- bad inputs ----------------------------------------------------------------------------------


def test_zero_bytes_is_empty() -> None:
    with pytest.raises(ImageError) as err:
        decode_image(b"", LIMITS)
    assert err.value.reason == "empty: zero-byte file"
    assert isinstance(err.value, ValueError)


def test_text_file_named_jpg_is_not_an_image(tmp_path) -> None:
    path = tmp_path / "photo.jpg"
    path.write_text("this is not a picture, just text\n")
    with pytest.raises(ImageError) as err:
        decode_image(path.read_bytes(), LIMITS)
    assert err.value.reason == "not_an_image: cannot identify image file"


def test_cut_jpeg_is_truncated() -> None:
    data = encode(noisy_rgb(), "JPEG")
    with pytest.raises(ImageError) as err:
        decode_image(data[: len(data) // 2], LIMITS)
    assert err.value.reason == "truncated: image file is truncated"


def test_jpeg_cut_inside_header_is_truncated_not_unidentified() -> None:
    data = encode(noisy_rgb(), "JPEG")
    with pytest.raises(ImageError) as err:
        decode_image(data[:20], LIMITS)
    assert err.value.reason == "truncated: image header is incomplete"


def test_cut_png_is_truncated() -> None:
    data = encode(noisy_rgb(), "PNG")
    with pytest.raises(ImageError) as err:
        decode_image(data[: len(data) // 2], LIMITS)
    assert err.value.reason.startswith("truncated: ")


def test_20000_square_rejected_from_header_without_allocating() -> None:
    data = png_header_only(20000, 20000)
    assert len(data) < 100
    with pytest.raises(ImageError) as err:
        decode_image(data, LIMITS)
    assert err.value.reason == "too_large: 20000x20000 = 400000000 pixels exceeds images.max_pixels=64000000"


def test_long_side_rejected() -> None:
    with pytest.raises(ImageError) as err:
        decode_image(png_header_only(20000, 10), LIMITS)
    assert err.value.reason == "too_large: side 20000 exceeds images.max_side=16384"


def test_size_is_checked_before_pixels_are_decoded() -> None:
    data = png_header_only(100, 100)  # no pixel data: loading it fails
    with pytest.raises(ImageError) as err:
        decode_image(data, LIMITS)
    assert err.value.reason.startswith("corrupt: ")
    with pytest.raises(ImageError) as err:
        decode_image(data, ImageLimits(max_pixels=5000))
    assert err.value.reason == "too_large: 100x100 = 10000 pixels exceeds images.max_pixels=5000"


@pytest.mark.parametrize("side", [10000, 20000])  # PIL warns above MAX_IMAGE_PIXELS, raises above twice that
def test_pil_bomb_guard_becomes_too_large_without_touching_globals(side: int) -> None:
    limits = ImageLimits(max_pixels=10**9, max_side=10**5)
    max_pixels_before = Image.MAX_IMAGE_PIXELS
    filters_before = list(warnings.filters)
    with pytest.raises(ImageError) as err:
        decode_image(png_header_only(side, side), limits)
    assert err.value.reason.startswith(f"too_large: {side}x{side} = {side * side} pixels exceeds PIL.Image.MAX_IMAGE")
    assert Image.MAX_IMAGE_PIXELS == max_pixels_before
    assert list(warnings.filters) == filters_before


# --- modes ---------------------------------------------------------------------------------------


def test_baseline_rgb_jpeg_keeps_original_bytes() -> None:
    data = encode(noisy_rgb(64, 48), "JPEG", quality=80)
    decoded = decode_image(data, LIMITS)
    assert decoded.jpg is data
    assert (decoded.width, decoded.height) == (64, 48) == decoded.original_size
    assert decoded.orientation == 1 and decoded.image.mode == "RGB"


def test_progressive_jpeg_is_reencoded() -> None:
    data = encode(noisy_rgb(), "JPEG", progressive=True)
    decoded = decode_image(data, LIMITS)
    assert decoded.jpg != data
    assert not Image.open(io.BytesIO(decoded.jpg)).info.get("progressive")


def test_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = Image.new("RGB", (32, 32), (220, 30, 30)).convert("CMYK")
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    decoded = decode_image(data, LIMITS)
    assert decoded.image.mode == "RGB" and decoded.jpg != data
    r, g, b = decoded.image.getpixel((16, 16))
    assert r > 200 and g < 60 and b < 60
    assert_stored_jpeg_is_rgb(decoded)


def test_16bit_grayscale_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257 * 64, 32896, 65535]], dtype=np.uint16).repeat(4, axis=0)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    decoded = decode_image(data, LIMITS)
    row = np.asarray(decoded.image)[0, :, 0]
    assert row.tolist() == [0, 64, 128, 255]
    assert_stored_jpeg_is_rgb(decoded)


def test_palette_png_transparency_composited_on_white() -> None:
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    pal.paste(1, (0, 0, 4, 8))
    data = encode(pal, "PNG", transparency=0)
    decoded = decode_image(data, LIMITS)
    assert decoded.image.getpixel((6, 4)) == (255, 255, 255)  # transparent red index
    assert decoded.image.getpixel((1, 4)) == (0, 0, 255)


def test_rgba_composited_on_white() -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 4, 8))
    rgba.paste((0, 0, 0, 128), (4, 0, 8, 4))
    decoded = decode_image(encode(rgba, "PNG"), LIMITS)
    assert decoded.image.getpixel((1, 6)) == (255, 0, 0)
    assert decoded.image.getpixel((6, 6)) == (255, 255, 255)
    assert all(abs(c - 127) <= 1 for c in decoded.image.getpixel((6, 1)))


def test_la_composited_on_white() -> None:
    la = Image.new("LA", (4, 4), (0, 0))
    la.paste((0, 255), (0, 0, 2, 4))
    decoded = decode_image(encode(la, "PNG"), LIMITS)
    assert decoded.image.getpixel((0, 0)) == (0, 0, 0)
    assert decoded.image.getpixel((3, 0)) == (255, 255, 255)


@pytest.mark.parametrize(("mode", "fill", "expected"), [("1", 1, (255, 255, 255)), ("L", 100, (100, 100, 100))])
def test_bilevel_and_grayscale_become_rgb(mode: str, fill: int, expected: tuple[int, int, int]) -> None:
    im = Image.new(mode, (6, 6), 0)
    im.paste(fill, (0, 0, 3, 6))
    decoded = decode_image(encode(im, "PNG"), LIMITS)
    assert decoded.image.mode == "RGB"
    assert decoded.image.getpixel((1, 1)) == expected
    assert decoded.image.getpixel((5, 1)) == (0, 0, 0)
    assert_stored_jpeg_is_rgb(decoded)


def test_grayscale_jpeg_is_stored_as_rgb() -> None:
    data = encode(Image.new("L", (16, 16), 90), "JPEG")
    decoded = decode_image(data, LIMITS)
    assert decoded.jpg != data
    assert_stored_jpeg_is_rgb(decoded)


# --- EXIF orientation ----------------------------------------------------------------------------

RED, BLUE = (255, 0, 0), (0, 0, 255)


def stored_with_red_corner() -> Image.Image:
    """40x20 blue image with a red block at the stored top-left (x 0..12, y 0..8)."""
    im = Image.new("RGB", (40, 20), BLUE)
    im.paste(RED, (0, 0, 12, 8))
    return im


def is_red(pixel) -> bool:
    return pixel[0] > 200 and pixel[2] < 60


def test_exif_orientation_6_rotates_clockwise() -> None:
    decoded = decode_image(with_exif(stored_with_red_corner(), "JPEG", 6), LIMITS)
    assert decoded.orientation == 6 and decoded.original_size == (40, 20)
    assert decoded.image.size == (20, 40)
    assert is_red(decoded.image.getpixel((16, 5)))  # stored top-left lands top-right
    assert not is_red(decoded.image.getpixel((3, 5)))
    stored = Image.open(io.BytesIO(decoded.jpg))
    assert stored.size == (20, 40) and stored.getexif().get(0x0112, 1) == 1


def test_exif_orientation_3_rotates_180() -> None:
    decoded = decode_image(with_exif(stored_with_red_corner(), "JPEG", 3), LIMITS)
    assert decoded.image.size == (40, 20)
    assert is_red(decoded.image.getpixel((35, 16)))
    assert not is_red(decoded.image.getpixel((4, 3)))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_pil_exif_transpose(orientation: int) -> None:
    data = with_exif(noisy_rgb(9, 5), "PNG", orientation)
    decoded = decode_image(data, LIMITS)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert np.array_equal(np.asarray(decoded.image), np.asarray(expected))
    assert decoded.orientation == orientation


def test_invalid_exif_orientation_is_ignored() -> None:
    decoded = decode_image(with_exif(noisy_rgb(9, 5), "PNG", 42), LIMITS)
    assert decoded.orientation == 1 and decoded.image.size == (9, 5)


# --- annotation transforms -----------------------------------------------------------------------

BOX = (5, 3, 17, 9)  # x1, y1, x2, y2 on a 30x20 stored image


def stored_rectangle() -> Image.Image:
    im = Image.new("L", (30, 20), 0)
    im.paste(255, BOX)
    return im


def pixel_box(arr: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(arr)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_boxes_follow_the_drawn_rectangle(orientation: int) -> None:
    im = stored_rectangle()
    upright = im if orientation == 1 else im.transpose(TRANSPOSE[orientation])
    moved = transform_boxes_for_orientation(np.array([BOX, (0, 0, 30, 20)]), orientation, im.size)
    assert moved.shape == (2, 4)
    assert moved[0].tolist() == pixel_box(np.asarray(upright))
    assert moved[1].tolist() == [0, 0, upright.width, upright.height]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_masks_follow_pil_transpose(orientation: int) -> None:
    im = stored_rectangle()
    im.paste(255, (25, 15, 27, 16))  # an asymmetric extra blob so a wrong flip cannot pass
    upright = im if orientation == 1 else im.transpose(TRANSPOSE[orientation])
    mask = np.asarray(im) > 0
    moved = transform_mask_for_orientation(mask, orientation)
    assert moved.flags.c_contiguous
    assert np.array_equal(moved, np.asarray(upright) > 0)


def rle_of(mask: np.ndarray) -> RLE:
    enc = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return RLE(size=tuple(enc["size"]), counts=enc["counts"].decode("ascii"))


def test_rle_and_known_annotations_follow_orientation_6() -> None:
    im = stored_rectangle()
    mask = np.asarray(im) > 0
    known = KnownAnnotations(
        regions=[
            Region(id=0, box_xyxy=BOX, label="thing", annotator="gt", mask=Mask(rle=rle_of(mask), annotator="gt"))
        ],
        background=[BackgroundMask(label="sky", rle=rle_of(~mask), annotator="gt")],
        notes=["kept"],
    )
    moved = transform_known_for_orientation(known, 6, im.size)
    upright = np.asarray(im.transpose(TRANSPOSE[6])) > 0
    region = moved.regions[0]
    assert list(region.box_xyxy) == pixel_box(upright)
    assert list(region.mask.rle.size) == [30, 20]
    assert np.array_equal(mask_utils.decode({"size": [30, 20], "counts": region.mask.rle.counts}), upright)
    assert np.array_equal(mask_utils.decode(moved.background[0].rle.model_dump()), ~upright)
    assert moved.notes == ["kept"] and moved.notes is not known.notes
    assert known.regions[0].box_xyxy == BOX  # input untouched
    assert transform_rle_for_orientation(known.regions[0].mask.rle, 1) == known.regions[0].mask.rle


def test_bad_orientation_is_rejected() -> None:
    with pytest.raises(ValueError, match="1..8"):
        transform_boxes_for_orientation(np.zeros((1, 4)), 9, (10, 10))
