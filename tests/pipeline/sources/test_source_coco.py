"""pipeline.sources.coco.CocoSource: boxes, masks, umg extension, captions, skipped annotations."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipeline.sources.base import Source
from pipeline.sources.coco import CocoSource, load_json, segmentation_to_rle

H, W = 24, 32


def decode(rle) -> np.ndarray:
    return mask_utils.decode({"size": list(rle.size), "counts": rle.counts}).astype(bool)


def object_mask() -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[4:10, 20:30] = True
    return mask


@pytest.fixture
def train(coco_root) -> CocoSource:
    ann = coco_root / "annotations"
    return CocoSource(ann / "instances_train.json", coco_root / "images" / "train", ann / "captions_train.json")


def test_refs_are_zero_padded_numeric_order_and_stable(train, coco_root) -> None:
    assert isinstance(train, Source) and train.kind == "coco"
    refs = train.list_refs()
    assert refs == ["000000000001", "000000000002", "000000000003", "000000000010"]
    again = CocoSource(coco_root / "annotations" / "instances_train.json", coco_root / "images" / "train")
    assert again.list_refs() == refs


def test_full_image_with_umg_extension(train, coco_root) -> None:
    (item,) = train.read(["000000000001"])
    assert item.error is None
    assert item.key == "train_000000" and item.source_id == "train_000000.jpg"
    assert item.image_bytes == (coco_root / "images" / "train" / "train_000000.jpg").read_bytes()
    known = item.known
    assert [(t.name, t.score, t.annotator) for t in known.tags] == [
        ("three", 1.0, "ground_truth"),
        ("red", 0.5, "ground_truth"),
    ]
    assert [(c.text, c.annotator) for c in known.captions] == [
        ("a red three and a seven", "ground_truth"),
        ("two digits", "ground_truth"),
    ]
    assert [bg.label for bg in known.background] == ["coffee"]
    assert np.array_equal(decode(known.background[0].rle), ~object_mask())

    poly, rle = known.regions
    assert (poly.id, poly.box_xyxy, poly.label, poly.score, poly.annotator) == (
        0, (2.0, 2.0, 12.0, 12.0), "three", 1.0, "ground_truth"
    )
    assert [(c.text, c.annotator) for c in poly.captions] == [("a red three", "ground_truth")]
    assert [t.name for t in poly.tags] == ["three", "red"]
    assert poly.mask.annotator == "ground_truth" and list(poly.mask.rle.size) == [H, W]
    assert 90 <= decode(poly.mask.rle).sum() <= 121  # the 10x10 polygon square (pycocotools rasterisation)
    assert (rle.id, rle.box_xyxy, rle.label, rle.captions, rle.tags) == (1, (20.0, 4.0, 30.0, 10.0), "seven", [], [])
    assert np.array_equal(decode(rle.mask.rle), object_mask())
    assert known.notes == []


def test_skipped_annotations_leave_notes_and_boxes_are_not_clipped(train) -> None:
    (item,) = train.read(["000000000003"])
    assert item.error is None
    (crowd,) = item.known.regions
    assert crowd.id == 1 and crowd.label == "seven"
    assert crowd.box_xyxy == (-5.0, 2.0, 95.0, 102.0)  # raw: clipping happens after decoding
    assert np.array_equal(decode(crowd.mask.rle), object_mask())  # from uncompressed RLE counts
    notes = item.known.notes
    assert len(notes) == 2
    assert notes[0] == "skipped annotation 0 (id 300): bbox [5, 5, 0, 4] has w<=0 or h<=0"
    assert notes[1] == "skipped annotation 2 (id 302): unknown category_id 99"


def test_image_without_annotations_and_empty_caption(train) -> None:
    (item,) = train.read(["000000000002"])
    assert item.error is None and item.image_bytes
    assert item.known.regions == [] and item.known.captions == []
    assert item.known.notes == ["skipped empty caption ''"]


def test_one_item_per_ref_in_order_with_errors(train, coco_root) -> None:
    refs = ["000000000010", "000000000001", "999", "000000000003"]
    items = list(train.read(refs))
    assert len(items) == 4
    assert items[0].error == f"missing_image: {coco_root / 'images' / 'train' / 'train_000009.jpg'}"
    assert items[0].image_bytes is None and items[0].key == "train_000009"
    assert items[1].key == "train_000000" and items[1].error is None
    assert items[2].error == "bad_ref: image id not in annotations (999)" and items[2].image_bytes is None
    assert items[3].key == "train_000002"


def test_plain_coco_without_umg_or_captions_file(tmp_path, image_bytes) -> None:
    doc = {
        "images": [{"id": 7, "file_name": "sub/pic.jpg", "width": 8, "height": 6}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [1, 1, 2, 3],
                         "segmentation": [[1, 1, 3, 1, 3, 4]]}],
        "categories": [{"id": 3, "name": "caf\xe9"}],
    }
    raw = json.dumps(doc, ensure_ascii=False).encode("utf-8").replace("café".encode(), b"caf\xe9")  # latin-1 byte
    (tmp_path / "instances.json").write_bytes(raw)
    (tmp_path / "img" / "sub").mkdir(parents=True)
    (tmp_path / "img" / "sub" / "pic.jpg").write_bytes(image_bytes(size=(8, 6)))
    source = CocoSource(tmp_path / "instances.json", tmp_path / "img")
    (item,) = source.read(source.list_refs())
    assert item.key == "sub_pic" and item.source_id == "sub/pic.jpg" and item.error is None
    (region,) = item.known.regions
    assert region.label == "caf\ufffd" and region.box_xyxy == (1.0, 1.0, 3.0, 4.0)
    assert region.mask is not None and region.captions == [] and region.tags == []
    assert item.known.tags == [] and item.known.captions == [] and item.known.background == []


def test_umg_captions_used_when_no_captions_file(coco_root) -> None:
    source = CocoSource(coco_root / "annotations" / "instances_train.json", coco_root / "images" / "train")
    (item,) = source.read(["000000000001"])
    assert [c.text for c in item.known.captions] == ["umg caption that must not duplicate the captions file"]


def test_bad_masks_are_dropped_with_notes_and_box_kept(tmp_path) -> None:
    doc = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 6}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "segmentation": [[1, 1, 2, 2]]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4],
             "segmentation": {"size": [60, 80], "counts": "PP5"}},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "i.json").write_text(json.dumps(doc))
    (item,) = CocoSource(tmp_path / "i.json", tmp_path).read(["000000000001"])
    assert item.error == f"missing_image: {tmp_path / 'a.jpg'}"
    assert [r.mask for r in item.known.regions] == [None, None]
    assert item.known.notes == [
        "annotation 0 (id 1): mask dropped: polygon 0 has 4 values, not an even number >= 6 (3 points)",
        "annotation 1 (id 2): mask dropped: RLE size [60, 80] != image [h, w] [6, 8]",
    ]


def test_segmentation_to_rle_forms_agree() -> None:
    mask = object_mask()
    compressed = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    from_str = segmentation_to_rle({"size": [H, W], "counts": compressed["counts"].decode()}, H, W)
    from_bytes = segmentation_to_rle({"size": [H, W], "counts": compressed["counts"]}, None, None)
    square = segmentation_to_rle([[20, 4, 30, 4, 30, 10, 20, 10]], H, W)
    assert from_str == from_bytes
    assert np.array_equal(decode(from_str), mask)
    assert decode(square)[5:9, 21:29].all() and not decode(square)[:, :19].any()
    with pytest.raises(ValueError, match="neither polygons nor RLE"):
        segmentation_to_rle(42, H, W)


def test_not_coco_json_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a COCO instances file"):
        CocoSource(tmp_path / "x.json", tmp_path).list_refs()
    (tmp_path / "y.json").write_text("{not json")
    with pytest.raises(ValueError, match="y.json: not valid JSON"):
        load_json(tmp_path / "y.json")


def test_malformed_entries_never_raise_from_read(tmp_path, image_bytes) -> None:
    doc = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 8, "height": 6, "umg": ["not", "an", "object"]},
            {"id": 2, "file_name": "b.jpg", "width": 8, "height": 6,
             "umg": {"tags": [{"nope": 1}], "background": [{"label": "sky"}], "captions": [None, "ok"]}},
            {"id": 3},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": "abc"},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [0, 0, 2, 2], "umg": {"captions": [""]}},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "i.json").write_text(json.dumps(doc))
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(image_bytes())
    source = CocoSource(tmp_path / "i.json", tmp_path)
    a, b, c = source.read(source.list_refs())
    assert a.error is None and a.known.regions == [] and a.known.notes == [
        "skipped annotation 0 (id 1): bbox 'abc' is not [x, y, w, h]"
    ]
    assert b.error is None and b.known.regions == [] and b.known.tags == []
    assert [cap.text for cap in b.known.captions] == ["ok"]
    assert b.known.notes == [
        "skipped tag 0: missing field 'name'",
        "skipped background 0: missing field 'segmentation'",
        "skipped empty caption None",
        "skipped annotation 0 (id 2): text: String should have at least 1 character",
    ]
    assert c.error == "bad_annotation: no file_name (000000000003)" and c.image_bytes is None


@pytest.mark.parametrize("bad", [float("nan"), 1e12, -1e9, float("inf"), True, "12"])
def test_polygon_coordinates_are_checked_before_pycocotools(bad) -> None:
    # NaN, 1e12 and -1e9 used to reach frPyObjects: a ~22 GB allocation or a segfault.
    polygon = [[2.0, 2.0, 12.0, 2.0, 12.0, 12.0, 2.0, bad]]
    with pytest.raises(ValueError, match="polygon 0"):
        segmentation_to_rle(polygon, H, W)
    assert decode(segmentation_to_rle([[-W, -H, 2 * W, -H, 2 * W, 2 * H]], H, W)).any()  # the margin is allowed


@pytest.mark.parametrize("counts, match", [
    ("PP5", "cover"),             # runs past h*w: pycocotools' decoder would write past its buffer
    ("0", "cover"),               # too few runs
    ("P", "ends inside a number"),  # the C decoder reads past the string's end
    ("0\x7f", "outside"),
    ([10, -2, 10], "non-negative"),
    ([H * W + 1], "cover"),
])
def test_rle_runs_must_cover_exactly_the_mask(counts, match) -> None:
    with pytest.raises(ValueError, match=match):
        segmentation_to_rle({"size": [H, W], "counts": counts}, H, W)


def _doc_with(images, annotations=(), categories=({"id": 1, "name": "thing"},)):
    return {"images": list(images), "annotations": list(annotations), "categories": list(categories)}


def test_file_names_escaping_the_image_folder_are_error_rows(tmp_path, image_bytes) -> None:
    images_dir, outside = tmp_path / "images", tmp_path / "outside"
    images_dir.mkdir()
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(image_bytes())
    doc = _doc_with([{"id": 1, "file_name": "../outside/secret.jpg"},
                     {"id": 2, "file_name": str(outside / "secret.jpg")}])
    (tmp_path / "i.json").write_text(json.dumps(doc))
    source = CocoSource(tmp_path / "i.json", images_dir)
    items = list(source.read(source.list_refs()))
    assert [i.error.split(":")[0] for i in items] == ["outside_root", "outside_root"]
    assert all(i.image_bytes is None for i in items)


def test_duplicate_ids_orphans_and_non_objects_each_become_one_error_ref(tmp_path, image_bytes) -> None:
    doc = _doc_with(
        [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}, {"id": 1, "file_name": "c.jpg"}, "junk"],
        [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]},
         {"id": 8, "image_id": 99, "category_id": 1, "bbox": [0, 0, 2, 2]},
         {"id": 9, "image_id": 99, "category_id": 1, "bbox": [0, 0, 2, 2]}, 5],
    )
    (tmp_path / "i.json").write_text(json.dumps(doc))
    (tmp_path / "a.jpg").write_bytes(image_bytes())
    source = CocoSource(tmp_path / "i.json", tmp_path)
    refs = source.list_refs()
    assert refs == ["!annotations/3", "!images/3", "000000000001", "000000000001#2", "000000000001#3",
                    "000000000099"]
    items = {i.source_id: i for i in CocoSource(tmp_path / "i.json", tmp_path).read(refs)}
    assert len(items) == len(refs)
    assert items["a.jpg"].error is None and len(items["a.jpg"].known.regions) == 1
    assert items["000000000001#2"].error.startswith("duplicate_id: images[1] (file_name 'b.jpg') repeats image id 1")
    assert items["000000000001#3"].error.startswith("duplicate_id: images[2] (file_name 'c.jpg')")
    assert items["000000000099"].error.startswith(
        "orphan_annotations: 2 annotations and 0 captions name image id 000000000099, which is not in 'images'")
    assert items["!images/3"].error.startswith("bad_annotation: images[3] is not an object")
    assert items["!annotations/3"].error.startswith("bad_annotation: annotations[3] is not an object")


def test_unusable_image_size_skips_polygons_with_a_note(tmp_path, image_bytes) -> None:
    square = [[1, 1, 5, 1, 5, 5]]
    doc = _doc_with([{"id": 1, "file_name": "a.jpg", "height": 10**6, "width": 10**6,
                      "umg": {"background": [{"label": "sky", "segmentation": square}]}}],
                    [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "segmentation": square}])
    (tmp_path / "i.json").write_text(json.dumps(doc))
    (tmp_path / "a.jpg").write_bytes(image_bytes())
    (item,) = CocoSource(tmp_path / "i.json", tmp_path).read(["000000000001"])
    assert item.error is None and item.known.regions[0].mask is None and item.known.background == []
    assert item.known.notes[0].startswith("image height/width not usable (mask size [1000000, 1000000] is empty or")
    assert "polygons need the image's height and width" in item.known.notes[1]
