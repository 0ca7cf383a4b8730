"""The ``oracle`` backends on a hand-written COCO set: zero noise gives the truth, each knob does what it says,
outputs depend only on the seed and the image (not on batching), and configs select and validate them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import annotators
from annotators.oracle import OracleDetector
from annotators.oracle_truth import box_blob, box_ious
from pipeline.filters import jitter_boxes

W, H = 80, 60
# image id -> [(category, [x, y, w, h])]; the boxes stay clear of the borders so shifts are not clipped
OBJECTS = {1: [("cat", [10, 10, 20, 16]), ("dog", [45, 20, 24, 30])], 2: [("bird", [20, 15, 30, 30])],
           3: [("dog", [30, 12, 18, 24])]}
CATEGORIES = ["cat", "dog", "bird"]


def _rect_polygon(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """Three noise images (PNG: exact pixels) with boxes, polygon masks, region captions and image captions."""
    root = tmp_path_factory.mktemp("oracle_coco")
    rng = np.random.default_rng(0)
    images, anns, caps = [], [], []
    for image_id, objects in OBJECTS.items():
        name = f"im{image_id}.png"
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / name)
        images.append({"id": image_id, "file_name": name, "width": W, "height": H})
        for k, (label, box) in enumerate(objects):
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": CATEGORIES.index(label) + 1,
                         "bbox": box, "area": box[2] * box[3], "iscrowd": 0, "segmentation": _rect_polygon(*box),
                         "umg": {"captions": [f"im{image_id} obj{k} a", f"im{image_id} obj{k} b"]}})
        caps += [{"id": len(caps) + j + 1, "image_id": image_id, "caption": f"image {image_id} caption {j}"}
                 for j in range(3)]
    instances = {"images": images, "annotations": anns,
                 "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CATEGORIES)]}
    (root / "instances.json").write_text(json.dumps(instances))
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": caps}))
    pictures = [Image.open(root / f"im{i}.png").convert("RGB") for i in OBJECTS]
    return {"instances": str(root / "instances.json"), "captions": str(root / "captions.json"),
            "image_dir": str(root)}, pictures


def _build(kind, cfg, **knobs):
    backend = annotators.build(kind, {"backend": "oracle", **cfg, **knobs})
    backend.load()
    return backend


def _true_boxes(image_id):
    return np.array([[x, y, x + w, y + h] for _, (x, y, w, h) in OBJECTS[image_id]], np.float32)


def _true_mask(image_id, k):
    x, y, w, h = OBJECTS[image_id][k][1]
    mask = np.zeros((H, W), bool)
    mask[y:y + h, x:x + w] = True  # what pycocotools rasterises for the rectangle polygon
    return mask


def test_zero_noise_reproduces_the_ground_truth(coco):
    cfg, pictures = coco
    found = _build("detector", cfg)(pictures)
    for image_id, out in zip(OBJECTS, found):
        np.testing.assert_allclose(out.boxes_xyxy, _true_boxes(image_id))
        assert out.labels == [label for label, _ in OBJECTS[image_id]]
        assert (out.scores > 0.5).all()
    captions = _build("captioner", cfg)(pictures)
    assert [[c.text for c in cs] for cs in captions] == [[f"image {i} caption {j}" for j in range(3)] for i in OBJECTS]
    regions = _build("region_captioner", cfg)(pictures, [_true_boxes(i) for i in OBJECTS])
    assert [[c.text for c in caps] for caps in regions[0]] == [["im1 obj0 a", "im1 obj0 b"], ["im1 obj1 a", "im1 obj1 b"]]
    masks = _build("segmenter", cfg)(pictures[:1], [_true_boxes(1)])[0].masks
    assert masks.shape == (2, H, W)
    assert (masks[0] == _true_mask(1, 0)).all() and (masks[1] == _true_mask(1, 1)).all()
    tags = _build("tagger", cfg)(pictures)
    assert [[t.name for t in ts] for ts in tags] == [["cat", "dog"], ["bird"], ["dog"]]


def test_box_shift_moves_each_box_by_at_most_the_fraction_of_its_size(coco):
    cfg, pictures = coco
    for image_id, out in zip(OBJECTS, _build("detector", cfg, box_shift=0.2)(pictures)):
        true = _true_boxes(image_id)
        sizes = np.tile(true[:, 2:] - true[:, :2], 2)
        moved = np.abs(out.boxes_xyxy - true)
        assert (moved <= 0.2 * sizes + 1e-4).all() and (moved > 0).any()
        np.testing.assert_allclose(out.boxes_xyxy[:, 2:] - out.boxes_xyxy[:, :2], true[:, 2:] - true[:, :2], atol=1e-4)


def test_label_flips_change_every_label_and_lower_the_scores(coco):
    cfg, pictures = coco
    clean = _build("detector", cfg)(pictures)
    flipped = _build("detector", cfg, label_flip_rate=1.0)(pictures)
    for image_id, out in zip(OBJECTS, flipped):
        assert all(l != t and l in CATEGORIES for l, (t, _) in zip(out.labels, OBJECTS[image_id]))
    assert np.concatenate([o.scores for o in flipped]).max() < np.concatenate([o.scores for o in clean]).min()


def test_misses_spurious_boxes_and_duplicates(coco):
    cfg, pictures = coco
    assert all(len(o.boxes_xyxy) == 0 for o in _build("detector", cfg, miss_rate=1.0)(pictures))
    dups = _build("detector", cfg, duplicate_rate=1.0, duplicate_shift=0.1)(pictures)
    for image_id, out in zip(OBJECTS, dups):
        n = len(OBJECTS[image_id])
        assert len(out.boxes_xyxy) == 2 * n and out.labels[n:] == out.labels[:n]
        assert (np.diag(box_ious(out.boxes_xyxy[n:], out.boxes_xyxy[:n])) > 0.6).all()  # a near copy
    spurious = _build("detector", cfg, spurious_per_image=4.0)(pictures * 5)
    extra = [out.boxes_xyxy[len(OBJECTS[i]):] for i, out in zip(list(OBJECTS) * 5, spurious)]
    assert sum(map(len, extra)) > 30  # Poisson(4) on 15 images
    boxes = np.concatenate(extra)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= W).all() and (boxes[:, 3] <= H).all()


def test_wrong_captions_come_from_other_images(coco):
    cfg, pictures = coco
    for image_id, caps in zip(OBJECTS, _build("captioner", cfg, wrong_caption_rate=1.0)(pictures)):
        assert caps and all(not c.text.startswith(f"image {image_id} ") for c in caps)
        assert all(c.text.startswith("image ") for c in caps)
    boxes = [_true_boxes(i) for i in OBJECTS]
    for image_id, per_box in zip(OBJECTS, _build("region_captioner", cfg, wrong_caption_rate=1.0)(pictures, boxes)):
        assert all(not c.text.startswith(f"im{image_id} ") for caps in per_box for c in caps)


def test_a_box_on_no_object_gets_another_images_region_captions_and_a_blob(coco):
    cfg, pictures = coco
    empty = np.array([[60, 2, 78, 14]], np.float32)  # image 1's background corner
    caps = _build("region_captioner", cfg)(pictures[:1], [empty])[0][0]
    assert caps and all(c.text.startswith(("im2 ", "im3 ")) for c in caps)
    seg = _build("segmenter", cfg)(pictures[:1], [empty], [jitter_boxes(empty, [0.1], W, H)])[0]
    assert (seg.masks[0] == box_blob(empty[0], H, W)).all()
    assert seg.stability[0] < 0.8  # the blob follows the box


@pytest.mark.parametrize("mode", ["blob", "dilate", "erode", "offset"])
def test_sloppy_masks(coco, mode):
    cfg, pictures = coco
    boxes = _true_boxes(2)
    jittered = jitter_boxes(boxes, [0.05, 0.1], W, H)
    seg = _build("segmenter", cfg, sloppy_mask_rate=1.0, sloppy_mask=mode, sloppy_mask_pixels=2)
    out = seg(pictures[1:2], [boxes], [jittered])[0]
    mask, true = out.masks[0], _true_mask(2, 0)
    if mode == "blob":
        assert (mask == box_blob(boxes[0], H, W)).all() and out.stability[0] < 0.9
        return
    assert out.stability[0] == 1.0  # the same object under every jittered box: jitter cannot see it
    if mode == "dilate":
        assert (mask >= true).all() and mask.sum() == (30 + 4) * (30 + 4)
    elif mode == "erode":
        assert (mask <= true).all() and mask.sum() == (30 - 4) * (30 - 4)
    else:
        assert mask.sum() == true.sum() and not (mask == true).all()
    clean = _build("segmenter", cfg)(pictures[1:2], [boxes], [jittered])[0]
    assert clean.stability[0] == 1.0 and (clean.masks[0] == true).all()


def test_an_image_without_boxes_gets_no_masks(coco):
    cfg, pictures = coco
    none = np.zeros((0, 4), np.float32)
    out = _build("segmenter", cfg)(pictures[:1], [none], [jitter_boxes(none, [0.1], W, H)])[0]
    assert out.masks.shape == (0, H, W) and out.stability.shape == (0,)
    assert _build("region_captioner", cfg)(pictures[:1], [none]) == [[]]


def test_outputs_depend_on_seed_and_image_only(coco):
    cfg, pictures = coco
    noisy = {"box_shift": 0.2, "label_flip_rate": 0.5, "spurious_per_image": 2.0, "duplicate_rate": 0.5}
    a = _build("detector", cfg, **noisy)(pictures)
    b = _build("detector", cfg, **noisy)(pictures[::-1])[::-1]  # another batch order
    c = _build("detector", cfg, seed=1, **noisy)(pictures)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.boxes_xyxy, y.boxes_xyxy)
        np.testing.assert_array_equal(x.scores, y.scores)
        assert x.labels == y.labels
    assert any(x.boxes_xyxy.shape != z.boxes_xyxy.shape or not np.array_equal(x.boxes_xyxy, z.boxes_xyxy)
               for x, z in zip(a, c))


def test_config_selects_and_validates_the_oracle(coco, tmp_path):
    cfg, pictures = coco
    assert isinstance(annotators.build("detector", {"backend": "oracle", **cfg}), OracleDetector)
    assert "oracle" in annotators.backends("segmenter")
    with pytest.raises(annotators.AnnotatorError, match="unknown config keys"):
        annotators.build("detector", {"backend": "oracle", **cfg, "box_shfit": 0.1})
    with pytest.raises(annotators.AnnotatorError, match="label_flip_rate"):
        annotators.build("detector", {"backend": "oracle", **cfg, "label_flip_rate": 1.5})
    with pytest.raises(annotators.AnnotatorError, match="sloppy_mask"):
        annotators.build("segmenter", {"backend": "oracle", **cfg, "sloppy_mask": "wobbly"})
    with pytest.raises(annotators.AnnotatorError, match="does not exist"):
        _build("captioner", {**cfg, "instances": str(tmp_path / "missing.json")})
    stranger = Image.fromarray(np.zeros((H, W, 3), np.uint8))
    with pytest.raises(ValueError, match="not in the oracle's annotations"):
        _build("detector", cfg)([stranger])
