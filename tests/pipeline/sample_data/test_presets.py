"""The SampleConfig preset ladder: every rung validates and generates; default == no preset; CLI --preset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from pipeline.sample_data import SampleConfig, generate_sample
from pipeline.sample_data.presets import PRESETS, preset_config, preset_names, probe_names

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools + numpy 2


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", preset_names() + probe_names())
def test_each_preset_generates_scenes_within_its_config(name, tmp_path):
    cfg = preset_config(name)
    summary = generate_sample(tmp_path, n=12, seed=3, config=cfg)
    assert SampleConfig.model_validate(summary.model_dump(mode="json")["config"]) == cfg
    instances = json.loads((tmp_path / "annotations" / "instances_train.json").read_text())
    assert instances["images"] and instances["annotations"]
    per_image: dict[int, int] = {}
    for ann in instances["annotations"]:
        assert ann["umg"]["color"] in cfg.palette
        per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
    assert max(per_image.values()) <= cfg.digits_per_image[1]
    assert set(summary.splits["train"].backgrounds) <= set(cfg.flat_backgrounds or cfg.backgrounds)


def _texts(root: Path) -> list[str]:
    """Every caption and tag of the train split (image and region level)."""
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    texts = []
    for entry in coco["images"]:
        texts += entry["umg"]["captions"] + [t["name"] for t in entry["umg"]["tags"]]
    for ann in coco["annotations"]:
        texts += ann["umg"]["captions"] + ann["umg"]["tags"]
    return texts


def test_probes_split_clutter_from_the_background_word(tmp_path):
    unnamed = generate_sample(tmp_path / "u", n=20, seed=3, config=preset_config("backgrounds_unnamed"))
    photos = set(unnamed.splits["train"].backgrounds)
    assert len(photos) > 1  # clutter: several photos were drawn ...
    words = {w for text in _texts(tmp_path / "u") for w in text.replace(",", " ").replace(":", " ").split()}
    assert not words & set(preset_config("backgrounds").backgrounds) and "background" not in words  # ... never named

    flat = preset_config("flat_named")
    generate_sample(tmp_path / "f", n=20, seed=3, config=flat)
    coco = json.loads((tmp_path / "f" / "annotations" / "instances_train.json").read_text())
    named = 0
    for entry in coco["images"]:
        word = entry["umg"]["background"][0]["label"]
        assert word in flat.flat_backgrounds and word in [t["name"] for t in entry["umg"]["tags"]]
        named += any(word in c for c in entry["umg"]["captions"])
        image = np.asarray(Image.open(tmp_path / "f" / "images" / "train" / entry["file_name"]))
        corner = image[:4, :4].reshape(-1, 3).astype(int)  # flat fill (JPEG: within a few levels)
        assert np.abs(corner - np.array(flat.flat_backgrounds[word])).max() <= 12
    assert named == len(coco["images"])


def test_ladder_order_and_learnable_rung():
    assert preset_names()[0] == "learnable" and preset_names()[-1] == "default"
    learnable = preset_config("learnable")
    assert list(learnable.palette) == ["white"] and learnable.backgrounds == ("grass",)
    assert learnable.upsample == "nearest" and learnable.digit_height_frac == (0.45, 0.7)
    # every rung differs from the one below it (each adds a difficulty)
    configs = [preset_config(n) for n in preset_names()]
    assert all(a != b for a, b in zip(configs, configs[1:]))
    assert preset_config("default") == SampleConfig() and PRESETS["default"][1] == {}


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown sample preset 'nope'.*learnable"):
        preset_config("nope")


def test_cli_preset_default_is_byte_identical_and_learnable_differs(tmp_path):
    runner = CliRunner()
    plain, named, learn = tmp_path / "plain", tmp_path / "named", tmp_path / "learn"
    assert runner.invoke(app, ["sample", "--out", str(plain), "--n", "12", "--seed", "1"]).exit_code == 0
    assert runner.invoke(app, ["sample", "--out", str(named), "--n", "12", "--seed", "1",
                               "--preset", "default"]).exit_code == 0
    assert _files(plain) == _files(named)
    result = runner.invoke(app, ["sample", "--out", str(learn), "--n", "12", "--seed", "1", "--preset", "learnable",
                                 "--shards", "--eval"])
    assert result.exit_code == 0, result.output
    summary = json.loads((learn / "raw" / "summary.json").read_text())
    assert summary["config"]["backgrounds"] == ["grass"]
    assert (learn / "train").is_dir() and (learn / "raw" / "classification" / "test").is_dir()
    bad = runner.invoke(app, ["sample", "--out", str(tmp_path / "x"), "--preset", "nope"])
    assert bad.exit_code == 2 and "error: unknown sample preset 'nope'" in bad.output
