"""The written dataset: layout, byte-determinism, exact COCO masks/boxes and the "umg" extension."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline.sample_data import SPLITS, SampleConfig, generate_sample, scene_for
from pipeline.sample_data.assets import split_counts
from pipeline.sample_data.coco_writer import encode_rle, mask_bbox_xywh
from pipeline.sample_data.templates import DIGIT_WORDS, fix_articles

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools + numpy 2

SEED = 3
N = 12


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "out"
    generate_sample(out, N, SEED)
    return out


def _instances(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def test_same_seed_same_bytes_other_seed_differs(dataset, tmp_path):
    again = tmp_path / "again"
    generate_sample(again, N, SEED)
    first, second = _files(dataset), _files(again)
    assert sorted(first) == sorted(second)
    assert all(first[name] == second[name] for name in first)
    other = tmp_path / "other"
    generate_sample(other, N, SEED + 1)
    third = _files(other)
    assert sorted(third) == sorted(first)
    assert first["annotations/instances_train.json"] != third["annotations/instances_train.json"]
    assert first["images/train/train_000000.jpg"] != third["images/train/train_000000.jpg"]


def test_layout_and_split_sizes(dataset):
    expected = dict(zip(SPLITS, split_counts(N, [0.8, 0.1, 0.1]), strict=True))
    summary = json.loads((dataset / "summary.json").read_text())
    assert summary["seed"] == SEED and summary["n"] == N
    assert summary["config"] == SampleConfig().model_dump(mode="json")
    reloaded = SampleConfig.model_validate(summary["config"])
    assert np.array_equal(scene_for(SEED, "train", 1, reloaded).image, scene_for(SEED, "train", 1).image)
    for split in SPLITS:
        instances = _instances(dataset, split)
        captions = json.loads((dataset / "annotations" / f"captions_{split}.json").read_text())
        names = [p.name for p in sorted((dataset / "images" / split).iterdir())]
        assert names == [f"{split}_{i:06d}.jpg" for i in range(expected[split])]
        assert [im["file_name"] for im in instances["images"]] == names
        assert [im["id"] for im in instances["images"]] == list(range(1, expected[split] + 1))
        assert [a["id"] for a in instances["annotations"]] == list(range(1, len(instances["annotations"]) + 1))
        assert summary["splits"][split]["images"] == expected[split]
        assert summary["splits"][split]["annotations"] == len(instances["annotations"])
        assert "date_created" not in instances["info"] and "year" not in instances["info"]
        assert [c["name"] for c in instances["categories"]] == list(DIGIT_WORDS)
        assert [c["id"] for c in instances["categories"]] == list(range(1, 11))
        assert [im["id"] for im in captions["images"]] == [im["id"] for im in instances["images"]]
        for image in instances["images"]:
            with Image.open(dataset / "images" / split / image["file_name"]) as jpg:
                assert jpg.format == "JPEG" and jpg.mode == "RGB"
                assert jpg.size == (image["width"], image["height"])


def test_masks_boxes_areas_match_the_composited_scene(dataset):
    for split in SPLITS:
        instances = _instances(dataset, split)
        for image in instances["images"]:
            scene = scene_for(SEED, split, image["id"] - 1)
            anns = [a for a in instances["annotations"] if a["image_id"] == image["id"]]
            assert len(anns) == len(scene.placements)
            for ann, placement, visible in zip(anns, scene.placements, scene.visible_masks, strict=True):
                decoded = mask_utils.decode(ann["segmentation"]).astype(bool)
                assert ann["segmentation"]["size"] == [image["height"], image["width"]]
                assert isinstance(ann["segmentation"]["counts"], str)
                assert np.array_equal(decoded, visible)
                rows, cols = np.nonzero(decoded)
                assert ann["bbox"] == [cols.min(), rows.min(), cols.max() + 1 - cols.min(), rows.max() + 1 - rows.min()]
                assert all(isinstance(v, float) for v in ann["bbox"])
                assert ann["area"] == int(decoded.sum())
                assert ann["category_id"] == placement.digit + 1 and ann["iscrowd"] == 0
                assert ann["umg"]["color"] == placement.color
            (background,) = image["umg"]["background"]
            assert background["label"] == scene.background
            assert np.array_equal(
                mask_utils.decode(background["segmentation"]).astype(bool), ~scene.visible_masks.any(0)
            )


def test_jpeg_is_close_to_the_composited_pixels(dataset):
    scene = scene_for(SEED, "train", 0)
    with Image.open(dataset / "images" / "train" / "train_000000.jpg") as jpg:
        decoded = np.asarray(jpg.convert("RGB"), dtype=np.int16)
    assert np.abs(decoded - scene.image).mean() < 6
    for placement, visible in zip(scene.placements, scene.visible_masks, strict=True):
        inner = (
            visible
            & np.roll(visible, 2, 0)
            & np.roll(visible, -2, 0)
            & np.roll(visible, 2, 1)
            & np.roll(visible, -2, 1)
        )
        if inner.any():
            colour = np.array(SampleConfig().palette[placement.color])
            assert np.abs(decoded[inner].mean(axis=0) - colour).max() < 12


def test_pycocotools_loads_and_ann_to_mask_matches(dataset):
    coco = COCO(str(dataset / "annotations" / "instances_train.json"))
    assert len(coco.getImgIds()) == split_counts(N, [0.8, 0.1, 0.1])[0]
    assert sorted(coco.getCatIds()) == list(range(1, 11))
    for ann in coco.loadAnns(coco.getAnnIds()):
        assert np.array_equal(coco.annToMask(ann), mask_utils.decode(ann["segmentation"]))
    caps = COCO(str(dataset / "annotations" / "captions_train.json"))
    assert len(caps.getAnnIds()) > 0


def test_captions_and_tags_follow_the_layout(dataset):
    for split in SPLITS:
        instances = _instances(dataset, split)
        captions = json.loads((dataset / "annotations" / f"captions_{split}.json").read_text())
        for image in instances["images"]:
            anns = [a for a in instances["annotations"] if a["image_id"] == image["id"]]
            digits = {DIGIT_WORDS[a["category_id"] - 1] for a in anns}
            colors = {a["umg"]["color"] for a in anns}
            background = image["umg"]["background"][0]["label"]
            tags = [t["name"] for t in image["umg"]["tags"]]
            assert set(tags) == digits | colors | {background} and len(tags) == len(set(tags))
            assert all(t["score"] == 1.0 for t in image["umg"]["tags"])
            texts = image["umg"]["captions"]
            assert len(set(texts)) == len(texts) >= 7
            for digit in digits:
                assert fix_articles(f"a photo of a {digit}") in texts
                assert digit in texts
            assert [c["caption"] for c in captions["annotations"] if c["image_id"] == image["id"]] == texts
            for ann in anns:
                word = DIGIT_WORDS[ann["category_id"] - 1]
                assert ann["umg"]["tags"] == [word, ann["umg"]["color"]]
                region_texts = ann["umg"]["captions"]
                assert len(set(region_texts)) == len(region_texts) >= 4
                assert word in region_texts and all(word in t for t in region_texts)
        ids = [c["id"] for c in captions["annotations"]]
        assert ids == list(range(1, len(ids) + 1))


def test_summary_records_held_back_digit_samples(dataset):
    summary = json.loads((dataset / "summary.json").read_text())
    train = set(summary["splits"]["train"]["digit_samples_used"])
    for split in ("val", "test"):
        assert not train & set(summary["splits"][split]["digit_samples_used"])
    assert sum(sum(s["digits_per_class"]) for s in summary["splits"].values()) == sum(
        s["annotations"] for s in summary["splits"].values()
    )


def test_rerun_replaces_an_earlier_generation_and_keeps_other_files(tmp_path):
    out = tmp_path / "out"
    generate_sample(out, 10, 0)
    (out / "notes.txt").write_text("mine")
    (out / "images" / "train" / "my_photo.jpg").write_bytes(b"x")
    generate_sample(out, 4, 0)
    fresh = tmp_path / "fresh"
    generate_sample(fresh, 4, 0)
    ours = {k: v for k, v in _files(out).items() if k not in {"notes.txt", "images/train/my_photo.jpg"}}
    assert ours == _files(fresh)
    assert (out / "notes.txt").exists() and (out / "images" / "train" / "my_photo.jpg").exists()


def test_zero_images_writes_empty_valid_files(tmp_path):
    summary = generate_sample(tmp_path / "empty", 0, 0)
    assert all(s.images == 0 for s in summary.splits.values())
    instances = _instances(tmp_path / "empty", "val")
    assert instances["images"] == [] and instances["annotations"] == [] and len(instances["categories"]) == 10


def test_encode_rle_and_bbox_on_a_hand_built_mask():
    mask = np.zeros((5, 7), dtype=bool)
    mask[1:4, 2] = True
    mask[3, 5] = True
    rle = encode_rle(mask)
    assert rle["size"] == [5, 7] and isinstance(rle["counts"], str)
    assert np.array_equal(mask_utils.decode(rle).astype(bool), mask)
    assert mask_bbox_xywh(mask) == [2.0, 1.0, 4.0, 3.0]
    with pytest.raises(ValueError):
        mask_bbox_xywh(np.zeros((3, 3), dtype=bool))
