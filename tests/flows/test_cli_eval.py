"""``umg eval zeroshot`` / ``umg eval retrieval`` end to end on a few tiny images, through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220)}


def _image(path, colour, seed):
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.integers(-20, 20, size=(24, 32, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "colours"
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(2):
            _image(root / f"c{c}_{name}" / f"{i}.png", colour, seed=10 * c + i)
    (root / "classnames.txt").write_text("red\ngreen\nblue\n")
    return root


@pytest.fixture
def caption_set(tmp_path):
    images, annotations = [], []
    for n, (name, colour) in enumerate(COLOURS.items()):
        _image(tmp_path / "imgs" / f"{name}.jpg", colour, seed=n)
        images.append({"id": n + 1, "file_name": f"{name}.jpg"})
        for k, text in enumerate([f"a {name} picture", name, f"something {name}"][: n + 1]):  # 1, 2, 3 captions
            annotations.append({"id": 10 * n + k, "image_id": n + 1, "caption": text})
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"images": images, "annotations": annotations}))
    return tmp_path / "imgs", captions


def _invoke(*args):
    return CliRunner().invoke(app, ["eval", *map(str, args)])


def _error(result) -> str:
    """The ``error:`` message of a failed command, unwrapped (rich wraps long lines)."""
    assert result.exit_code == 2, result.output
    text = " ".join(result.stderr.split())
    assert text.startswith("error:"), text
    return text


def _last_json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_zeroshot_cli(tiny_checkpoint, image_folder, tmp_path):
    out = tmp_path / "res" / "zs.json"
    result = _last_json(_invoke("zeroshot", "--checkpoint", tiny_checkpoint[0], "--data", image_folder,
                                "--out", out, "--batch-size", 4))
    assert result["task"] == "zeroshot_classification" and result["dataset"] == "colours"
    assert set(result["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert result["metrics"]["acc5"] is None and 0.0 <= result["metrics"]["acc1"] <= 1.0  # 3 classes: no top-5
    assert result["n_images"] == 6 and result["n_classes"] == 3
    assert json.loads(out.read_text()) == result
    assert "top-1" in (tmp_path / "res" / "zs.md").read_text()


def test_zeroshot_cli_errors(tiny_checkpoint, image_folder, tmp_path):
    (image_folder / "c3_empty").mkdir()
    assert "c3_empty" in _error(_invoke("zeroshot", "--checkpoint", tiny_checkpoint[0], "--data", image_folder))
    missing = _invoke("zeroshot", "--checkpoint", tiny_checkpoint[0], "--data", tmp_path / "nope")
    assert "nope: no such directory" in _error(missing)
    (image_folder / "c3_empty").rmdir()
    (image_folder / "classnames.txt").write_text("red\ngreen\n")
    short = _invoke("zeroshot", "--checkpoint", tiny_checkpoint[0], "--data", image_folder)
    assert "2 names for 3 class folders" in _error(short)
    bad_ckpt = _invoke("zeroshot", "--checkpoint", tmp_path / "no-run", "--data", image_folder)
    assert "no-run" in _error(bad_ckpt)


def test_retrieval_cli(tiny_checkpoint, caption_set, tmp_path):
    images, captions = caption_set
    out = tmp_path / "ret.json"
    result = _last_json(_invoke("retrieval", "--checkpoint", tiny_checkpoint[1], "--images", images,
                                "--captions", captions, "--out", out))
    keys = {f"{side}_retrieval_recall@{k}" for side in ("image", "text") for k in (1, 5, 10)}
    assert result["task"] == "zeroshot_retrieval" and set(result["metrics"]) == keys
    assert result["n_images"] == 3 and result["n_captions"] == 6
    assert 0.0 <= result["metrics"]["text_retrieval_recall@5"] <= 1.0  # 6 captions: defined
    # 3 images, 6 captions: T2I R@5 and I2T R@10 are undefined (null), "–" in the table
    assert result["metrics"]["image_retrieval_recall@5"] is None is result["metrics"]["text_retrieval_recall@10"]
    assert "I2T R@1" in out.with_suffix(".md").read_text() and "–" in out.with_suffix(".md").read_text()


def test_retrieval_cli_group_identical_texts(tiny_checkpoint, caption_set):
    images, captions = caption_set
    data = json.loads(captions.read_text())
    data["annotations"].append({"id": 99, "image_id": 1, "caption": "green"})  # "green" now names two images
    captions.write_text(json.dumps(data))
    result = _last_json(_invoke("retrieval", "--checkpoint", tiny_checkpoint[1], "--images", images,
                                "--captions", captions, "--group-identical-texts"))
    assert result["n_captions"] == 7 and result["n_distinct_texts"] == 6
    assert result["protocol"] == "grouped_identical_texts"
    assert result["metrics"]["text_retrieval_recall@5"] is not None and result["metrics"]["image_retrieval_recall@5"] is None


def test_retrieval_cli_missing_image_is_an_error(tiny_checkpoint, caption_set):
    images, captions = caption_set
    (images / "green.jpg").unlink()
    failed = _invoke("retrieval", "--checkpoint", tiny_checkpoint[1], "--images", images, "--captions", captions)
    message = _error(failed)
    assert "1 image file(s) missing" in message and "green.jpg" in message
