"""The evaluation layouts of the digit scenes: exact label maps / panoptic PNGs, ImageFolder, determinism, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from pipeline.sample_data import generate_sample, scene_for
from pipeline.sample_data.eval_formats import (
    EVAL_TEMPLATES,
    IGNORE,
    classification_scene,
    id_to_rgb,
    write_eval_layouts,
)
from pipeline.sample_data.generate import digit_pools
from pipeline.sample_data.templates import DIGIT_WORDS, image_captions, region_captions
from pipeline.sample_data.config import SampleConfig
from model.eval.seg_eval import rgb_to_id  # the reader side of the format

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools + numpy 2

SEED = 5
N = 12  # 10 / 1 / 1 images


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "out"
    generate_sample(out, N, SEED)
    write_eval_layouts(out)
    return out


def test_label_maps_and_panoptic_pngs_match_the_instances_json(dataset):
    instances = json.loads((dataset / "annotations" / "instances_train.json").read_text())
    panoptic = json.loads((dataset / "annotations" / "panoptic_train.json").read_text())
    assert [c["name"] for c in panoptic["categories"]] == list(DIGIT_WORDS)
    assert all(c["isthing"] == 1 for c in panoptic["categories"])
    classes = (dataset / "annotations" / "classes.txt").read_text().splitlines()
    assert classes == list(DIGIT_WORDS)
    for image, entry in zip(instances["images"], panoptic["annotations"], strict=True):
        stem = Path(image["file_name"]).stem
        assert entry["image_id"] == image["id"] and entry["file_name"] == f"{stem}.png"
        label_map = np.array(Image.open(dataset / "annotations" / "semantic_train" / f"{stem}.png"))
        seg = rgb_to_id(np.array(Image.open(dataset / "annotations" / "panoptic_train" / f"{stem}.png")))
        assert label_map.shape == seg.shape == (image["height"], image["width"])
        anns = [a for a in instances["annotations"] if a["image_id"] == image["id"]]
        covered = np.zeros_like(label_map, dtype=bool)
        for ann, info in zip(anns, entry["segments_info"], strict=True):
            mask = mask_utils.decode(ann["segmentation"]).astype(bool)
            assert np.array_equal(seg == info["id"], mask)
            assert (label_map[mask] == ann["category_id"] - 1).all()
            assert info["category_id"] == ann["category_id"] and info["area"] == ann["area"]
            assert info["bbox"] == ann["bbox"]
            covered |= mask
        assert (label_map[~covered] == IGNORE).all() and (seg[~covered] == 0).all()


def test_label_map_is_the_scene_ground_truth(dataset):
    scene = scene_for(SEED, "test", 0)
    label_map = np.array(Image.open(dataset / "annotations" / "semantic_test" / "test_000000.png"))
    expected = np.full(scene.image.shape[:2], IGNORE, dtype=np.uint8)
    for placement, mask in zip(scene.placements, scene.visible_masks, strict=True):
        expected[mask] = placement.digit
    assert np.array_equal(label_map, expected)


def test_classification_imagefolder_is_balanced_single_digit_and_held_out(dataset):
    root = dataset / "classification" / "test"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [str(d) for d in range(10)]
    assert (root / "classnames.txt").read_text().splitlines() == list(DIGIT_WORDS)
    assert (root / "templates.txt").read_text().splitlines() == list(EVAL_TEMPLATES)
    test_pool = set(digit_pools(SEED, SampleConfig())["test"].tolist())
    for digit in range(10):
        files = sorted((root / str(digit)).glob("*.jpg"))
        assert len(files) == 1  # ceil(1 test image / 10)
        scene = classification_scene(SEED, "test", digit, 0, SampleConfig())
        assert [p.digit for p in scene.placements] == [digit]
        assert scene.placements[0].sample in test_pool
        assert Image.open(files[0]).size == (scene.width, scene.height)
    assert len(list((dataset / "classification" / "train").rglob("*.jpg"))) == 10


def test_same_seed_same_bytes_and_rewrite_replaces(dataset, tmp_path):
    again = tmp_path / "again"
    generate_sample(again, N, SEED)
    counts = write_eval_layouts(again)
    write_eval_layouts(again)  # a second run replaces, it does not add
    assert counts["train"] == {"images": 10, "segments": counts["train"]["segments"], "classification_images": 10}
    first, second = _files(dataset), _files(again)
    assert sorted(first) == sorted(second)
    assert all(first[name] == second[name] for name in first)


def test_eval_templates_are_training_captions_for_every_digit():
    for digit, word in enumerate(DIGIT_WORDS):
        prompts = [t.format(word) for t in EVAL_TEMPLATES]
        assert set(prompts) <= set(image_captions([(digit, "red")], "coffee"))
        assert set(prompts) <= set(region_captions(digit, "red", "coffee"))


def test_id_rgb_round_trip():
    ids = np.array([[0, 1, 255], [256, 70000, 16777215]])
    assert np.array_equal(rgb_to_id(id_to_rgb(ids)), ids)


def test_needs_a_finished_generation(tmp_path):
    with pytest.raises(FileNotFoundError, match="summary.json"):
        write_eval_layouts(tmp_path)


def test_cli_sample_eval(tmp_path):
    from flows.cli import app

    result = CliRunner().invoke(app, ["sample", "--out", str(tmp_path / "d"), "--n", "12", "--seed", "1", "--eval"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["eval"]["val"]["images"] == 1 and summary["eval"]["val"]["classification_images"] == 10
    assert (tmp_path / "d" / "annotations" / "panoptic_val.json").is_file()
