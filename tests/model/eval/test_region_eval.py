"""Region zero-shot classification: exact on a model whose region embedding is a function of the box."""

from __future__ import annotations

import json

import pytest
import torch.nn.functional as F

from colour_model import CLASSES, PixelColourModel, preprocess_to, tokenize
from model.eval.datasets import EvalDataError
from model.eval.region_eval import evaluate_regions


def test_exact_region_model_scores_100_percent_and_ap_1(colour_dataset):
    metrics, info = evaluate_regions(PixelColourModel(), preprocess_to(64), tokenize, colour_dataset / "images",
                                     colour_dataset / "instances.json", templates=["{}"], batch_size=2)
    assert info["n_boxes"] == 7 and info["n_images"] == 3 and info["n_classes"] == 3
    assert metrics["acc1"] == 1.0 and metrics["mean_per_class_recall"] == 1.0
    assert metrics["box_ap"] == pytest.approx(1.0) and metrics["box_ap50"] == pytest.approx(1.0)


def test_swapped_text_embeddings_score_zero(colour_dataset):
    swapped = PixelColourModel()
    swapped.encode_text = lambda tokens: F.one_hot((tokens[:, 0] + 1) % 3, len(CLASSES)).float()  # red -> green ...
    metrics, _ = evaluate_regions(swapped, preprocess_to(64), tokenize, colour_dataset / "images",
                               colour_dataset / "instances.json", templates=["{}"], topk=1)
    assert metrics["acc1"] == 0.0 and metrics["box_ap"] < 0.2


def test_missing_image_is_a_clear_error(colour_dataset):
    (colour_dataset / "images" / "img1.png").unlink()
    with pytest.raises(FileNotFoundError, match="img1.png"):
        evaluate_regions(PixelColourModel(), preprocess_to(64), tokenize, colour_dataset / "images",
                         colour_dataset / "instances.json", templates=["{}"])


def test_attribute_classification_uses_the_field_as_category(colour_dataset):
    path = colour_dataset / "instances.json"
    data = json.loads(path.read_text())
    for ann in data["annotations"]:
        ann["category_id"] = 5  # every box is "red" by category; the true colour is only in attrs.paint
    path.write_text(json.dumps(data))
    by_category, _ = evaluate_regions(PixelColourModel(), preprocess_to(64), tokenize, colour_dataset / "images", path,
                                      templates=["{}"])
    metrics, info = evaluate_regions(PixelColourModel(), preprocess_to(64), tokenize, colour_dataset / "images", path,
                                     templates=["{}"], attribute="attrs.paint")
    assert by_category["acc1"] < 0.5
    assert metrics["acc1"] == 1.0 and metrics["box_ap"] == pytest.approx(1.0)
    assert info["attribute"] == "attrs.paint" and info["n_classes"] == 3
    with pytest.raises(EvalDataError, match="attrs.nope"):
        evaluate_regions(PixelColourModel(), preprocess_to(64), tokenize, colour_dataset / "images", path,
                         templates=["{}"], attribute="attrs.nope")
