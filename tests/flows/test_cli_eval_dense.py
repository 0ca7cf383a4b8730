"""``umg eval regions`` / ``umg eval seg`` end to end through the CLI on the digit scenes' eval layouts
(``umg sample --eval``), with a tiny untrained checkpoint saved through the real save path."""

from __future__ import annotations

import json

import pytest
from test_cli_eval import _error, _invoke, _last_json  # the zeroshot / retrieval CLI tests' helpers

from pipeline.sample_data import generate_sample
from pipeline.sample_data.eval_formats import write_eval_layouts

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools + numpy 2


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    generate_sample(root, n=12, seed=0)
    write_eval_layouts(root)
    return root


def _in_unit_interval(metrics: dict) -> bool:
    return all(0.0 <= v <= 1.0 for v in metrics.values())


def test_regions_cli(tiny_checkpoint, digits, tmp_path):
    ann = digits / "annotations"
    out = tmp_path / "res" / "regions.json"
    result = _last_json(_invoke("regions", "--checkpoint", tiny_checkpoint[0], "--images", digits / "images" / "train",
                                "--annotations", ann / "instances_train.json", "--limit", 3, "--batch-size", 2,
                                "--out", out))
    assert result["task"] == "zeroshot_region_classification" and result["n_images"] == 3
    assert set(result["metrics"]) == {"acc1", "acc5", "mean_per_class_recall", "box_ap", "box_ap50"}
    assert _in_unit_interval(result["metrics"]) and result["n_classes"] == 10
    assert result["templates"] == ["{}", "a handwritten {}"]  # annotations/templates.txt was picked up
    assert json.loads(out.read_text()) == result
    assert "box AP" in out.with_suffix(".md").read_text()


def test_seg_cli_with_panoptic(tiny_checkpoint, digits):
    ann = digits / "annotations"
    result = _last_json(_invoke("seg", "--checkpoint", tiny_checkpoint[1], "--images", digits / "images" / "train",
                                "--masks", ann / "semantic_train", "--classes", ann / "classes.txt",
                                "--panoptic", ann / "panoptic_train.json", "--limit", 3))
    assert result["task"] == "semantic_segmentation" and result["mode"] == "training-free"
    assert result["n_images"] == 3 and result["n_panoptic_images"] == 3
    assert {"miou", "pixel_acc", "macc", "pq", "sq", "rq", "pq_th"} <= set(result["metrics"])
    assert "pq_st" not in result["metrics"]  # the digits are all things
    assert _in_unit_interval(result["metrics"])


def test_seg_cli_maskclip_and_mmseg_options(tiny_checkpoint, digits):
    ann = digits / "annotations"
    args = ["seg", "--checkpoint", tiny_checkpoint[1], "--images", digits / "images" / "train", "--masks",
            ann / "semantic_train", "--classes", ann / "classes.txt", "--limit", 2]
    result = _last_json(_invoke(*args, "--dense-features", "maskclip", "--miou-convention", "mmseg"))
    assert result["dense_features"] == "maskclip" and result["miou_convention"] == "mmseg"
    assert _in_unit_interval(result["metrics"])
    assert "--dense-features must be one of tokens, maskclip" in _error(_invoke(*args, "--dense-features", "x"))
    short = _last_json(_invoke(*args, "--short-side", 80, "--max-side", 100, "--panoptic", ann / "panoptic_train.json"))
    assert short["input"] == "short side 80, max 100" and _in_unit_interval(short["metrics"])
    assert "--miou-convention must be one of detectron2, mmseg" in _error(_invoke(*args, "--miou-convention", "voc"))


def test_zeroshot_and_retrieval_run_on_the_converted_digits(tiny_checkpoint, digits):
    run, val = tiny_checkpoint[0], digits / "images" / "val"
    zeroshot = _last_json(_invoke("zeroshot", "--checkpoint", run, "--data", digits / "classification" / "val"))
    assert zeroshot["n_images"] == 10 and zeroshot["n_classes"] == 10
    retrieval = _last_json(_invoke("retrieval", "--checkpoint", run, "--images", val,
                                   "--captions", digits / "annotations" / "captions_val.json"))
    assert retrieval["metrics"]["text_retrieval_recall@1"] == 1.0  # one image: its captions rank first


def test_bad_inputs_give_one_error_line(tiny_checkpoint, digits, tmp_path):
    ann, run, val = digits / "annotations", tiny_checkpoint[0], digits / "images" / "val"
    assert "no such file" in _error(_invoke("seg", "--checkpoint", run, "--images", val,
                                            "--masks", ann / "semantic_val", "--classes", tmp_path / "none.txt"))
    assert "no image for label maps" in _error(_invoke(
        "seg", "--checkpoint", run, "--images", val, "--masks", ann / "semantic_train",
        "--classes", ann / "classes.txt"))
    assert "not a COCO instances file" in _error(_invoke(
        "regions", "--checkpoint", run, "--images", val, "--annotations", ann / "captions_val.json"))
