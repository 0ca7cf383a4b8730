"""SourceItem -> stored image + ground-truth record: the documented repairs of known annotations."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import pipeline.images as images_module
from data_schemas import RLE, BackgroundMask, ImageLimits, Mask, Region
from pipeline.images import ImageError
from pipeline.ingest import ingest_item
from pipeline.masks import decode_mask, encode_mask
from pipeline.sources.base import KnownAnnotations, SourceItem


def _jpeg(width: int, height: int, orientation: int = 1) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", (width, height), (200, 30, 30))
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    return buffer.getvalue()


def _region(rid: int, box, mask_size=None) -> Region:
    mask = None
    if mask_size is not None:
        pixels = np.zeros(mask_size, dtype=bool)
        pixels[: mask_size[0] // 2, : mask_size[1] // 2] = True
        mask = Mask(rle=encode_mask(pixels), annotator="ground_truth")
    return Region(id=rid, box_xyxy=box, label="three", annotator="ground_truth", mask=mask)


def test_boxes_are_clipped_or_dropped_and_noted():
    known = KnownAnnotations(regions=[
        _region(0, (10, 10, 30, 30)),        # inside: unchanged
        _region(1, (50, 20, 90, 45)),        # partly outside 64x48: clipped
        _region(2, (70, 10, 90, 20)),        # entirely outside: dropped
        _region(3, (5, 5, 20, 20), (10, 10)),  # mask of the wrong size: mask dropped, box kept
    ])
    done = ingest_item(SourceItem("k", "k.jpg", _jpeg(64, 48), known), "coco", ImageLimits())
    regions = {r.id: r for r in done.record.regions}
    assert regions[0].box_xyxy == (10, 10, 30, 30)
    assert regions[1].box_xyxy == (50, 20, 64, 45)
    assert 2 not in regions
    assert regions[3].mask is None and regions[3].box_xyxy == (5, 5, 20, 20)
    assert done.notes == [
        "dropped mask of region 3: size [10, 10] != image",  # checked first, before any mask is decoded
        "clipped region 1 box [50.0, 20.0, 90.0, 45.0] to the image",
        "dropped region 2: box [70.0, 10.0, 90.0, 20.0] has no area inside the image",
    ]
    assert (done.record.width, done.record.height, done.record.source) == (64, 48, "coco")


def test_exif_rotation_moves_known_boxes_and_masks():
    # Stored 60x40 with orientation 6 (rotate 90 clockwise to display): upright image is 40x60.
    known = KnownAnnotations(regions=[_region(0, (0, 0, 30, 20), (40, 60))])
    done = ingest_item(SourceItem("r", "r.jpg", _jpeg(60, 40, orientation=6), known), "folder", ImageLimits())
    assert (done.record.width, done.record.height) == (40, 60)
    region = done.record.regions[0]
    # The stored top-left 30x20 block ends up at the top-right after a clockwise turn.
    assert region.box_xyxy == (20, 0, 40, 30)
    mask = decode_mask(region.mask.rle)
    assert mask.shape == (60, 40)
    assert mask[:30, 20:].all() and mask.sum() == 30 * 20


def test_source_errors_and_bad_images_raise_with_the_reason():
    with pytest.raises(ValueError, match="missing_image: /x.jpg"):
        ingest_item(SourceItem("m", "m.jpg", None, error="missing_image: /x.jpg"), "coco", ImageLimits())
    with pytest.raises(ImageError, match="^empty"):
        ingest_item(SourceItem("e", "e.jpg", b""), "folder", ImageLimits())


def test_source_notes_are_carried():
    known = KnownAnnotations(notes=["not_utf8: caption: invalid bytes replaced"])
    done = ingest_item(SourceItem("n", "n.jpg", _jpeg(8, 8), known), "folder", ImageLimits())
    assert done.notes == ["not_utf8: caption: invalid bytes replaced"]
    assert done.record.provenance == {}


def test_wrongly_sized_masks_are_dropped_before_the_exif_transform_decodes_them(monkeypatch):
    huge = RLE(size=(40_000, 40_000), counts="0")  # decoding it would allocate 1.6 GB
    known = KnownAnnotations(
        regions=[Region(id=0, box_xyxy=(0, 0, 10, 10), label="three", annotator="ground_truth",
                        mask=Mask(rle=huge, annotator="ground_truth"))],
        background=[BackgroundMask(label="sky", rle=huge, annotator="ground_truth")],
    )
    decoded_sizes = []
    real_decode = images_module.decode_mask
    monkeypatch.setattr(images_module, "decode_mask", lambda rle: decoded_sizes.append(rle.size) or real_decode(rle))
    done = ingest_item(SourceItem("r", "r.jpg", _jpeg(60, 40, orientation=6), known), "folder", ImageLimits())
    assert decoded_sizes == []
    assert done.record.regions[0].mask is None and done.record.background == []
    assert done.notes == ["dropped mask of region 0: size [40000, 40000] != image",
                          "dropped background 'sky': mask size [40000, 40000] != image"]
