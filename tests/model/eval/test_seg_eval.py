"""Segmentation evaluation: the training-free segmenter on an exact pixel model, panoptic baseline, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from colour_model import CLASSES, PixelColourModel, preprocess_to, tokenize
from model.eval.datasets import EvalDataError
from model.eval.seg_eval import (
    drop_zero_label,
    evaluate_segmentation,
    pair_images_and_masks,
    read_classes,
    upsampled_argmax,
)
from model.eval.segmenter import TrainingFreeSegmenter, semantic_to_panoptic


def _run(root, model=None, size=128, **kwargs):
    metrics, info = evaluate_segmentation(model or PixelColourModel(), preprocess_to(size), tokenize, root / "images",
                                 root / "masks", root / "classes.txt", templates=["{}"], **kwargs)
    return {"metrics": metrics, **info}


def test_exact_dense_model_scores_miou_1_and_pq_1(colour_dataset):
    # 128 x 128 input: the 128 x 64 images are stretched by 2 in y (nearest) and shrunk back exactly.
    result = _run(colour_dataset, panoptic=colour_dataset / "panoptic.json", batch_size=2)
    m = result["metrics"]
    assert result["mode"] == "training-free" and result["n_images"] == 3 and result["n_panoptic_images"] == 3
    assert m["miou"] == pytest.approx(1.0) and m["pixel_acc"] == pytest.approx(1.0)
    assert m["pq"] == pytest.approx(1.0) and m["pq_th"] == pytest.approx(1.0) and m["pq_st"] == pytest.approx(1.0)
    assert result["iou_per_class"] == pytest.approx(dict.fromkeys(CLASSES, 1.0))


def test_squashed_input_is_mapped_back_to_label_map_size(colour_dataset):
    # 64 x 64 input halves x: predictions come back at 128 x 64 and are still nearly exact (edges blur).
    m = _run(colour_dataset, size=64)["metrics"]
    assert 0.9 < m["miou"] <= 1.0


def test_wrong_text_gives_low_miou(colour_dataset):
    swapped = PixelColourModel()
    swapped.encode_text = lambda tokens: torch.nn.functional.one_hot((tokens[:, 0] + 1) % 4, 4).float()
    assert _run(colour_dataset, model=swapped)["metrics"]["miou"] == pytest.approx(0.0)


def test_adapted_model_is_used_as_is(colour_dataset):
    class Adapted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.umg = PixelColourModel()
            self.calls = 0

        def segment_semantic(self, images, text_emb):
            self.calls += 1
            return TrainingFreeSegmenter(self.umg).segment_semantic(images, text_emb)

    model = Adapted()
    result = _run(colour_dataset, model=model, batch_size=2)
    assert result["mode"] == "adapted" and model.calls == 2 and result["metrics"]["miou"] == pytest.approx(1.0)


def test_semantic_to_panoptic_splits_things_into_components_and_keeps_stuff_whole():
    labels = np.array([[0, 0, 1, 0],
                       [1, 1, 1, 0],
                       [0, 0, 1, 1]])
    scores = np.full(labels.shape, 0.5)
    seg, segments = semantic_to_panoptic(labels, scores, np.array([True, False]))
    # class 0 (thing): {(0,0),(0,1)}, {(0,3),(1,3)}, {(2,0),(2,1)} are 8-separated by class 1 (stuff, one segment)
    assert sorted((s["category_id"], s["isthing"]) for s in segments) == [(0, True)] * 3 + [(1, False)]
    assert len(np.unique(seg[labels == 0].numpy())) == 3 and len(np.unique(seg[labels == 1].numpy())) == 1
    seg, segments = semantic_to_panoptic(labels, scores, np.array([True, False]), min_area=3)
    assert [s["category_id"] for s in segments] == [1] and (seg[labels == 0] == 0).all()


def test_bad_inputs_are_clear_errors(colour_dataset, tmp_path):
    (tmp_path / "blank.txt").write_text("a\n\nb\n")
    with pytest.raises(ValueError, match="blank"):
        read_classes(tmp_path / "blank.txt")
    (colour_dataset / "images" / "img2.png").unlink()
    with pytest.raises(EvalDataError, match="img2"):
        pair_images_and_masks(colour_dataset / "images", colour_dataset / "masks")
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(colour_dataset / "images" / "img2.png")
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(colour_dataset / "masks" / "img2.png")
    with pytest.raises(ValueError, match="mode RGB"):
        _run(colour_dataset)


def test_reduce_zero_label_reads_raw_ade_and_voc_maps(colour_dataset):
    assert drop_zero_label(np.array([[0, 1, 2], [151, 255, 3]])).tolist() == [[255, 0, 1], [150, 255, 2]]
    for path in (colour_dataset / "masks").glob("*.png"):  # shift to ADE-style: 0 = "other", class c stored as c + 1
        label = np.array(Image.open(path)).astype(np.int64)
        Image.fromarray(np.where(label == 255, 0, label + 1).astype(np.uint8)).save(path)
    result = _run(colour_dataset, reduce_zero_label=True)
    assert result["metrics"]["miou"] == pytest.approx(1.0)


def test_chunked_upsampled_argmax_equals_one_argmax():
    probs = torch.rand(150, 12, 12, generator=torch.Generator().manual_seed(0))
    full = torch.nn.functional.interpolate(probs[None], size=(37, 29), mode="bilinear", align_corners=False)[0]
    assert torch.equal(upsampled_argmax(probs, (37, 29), chunk=16), full.argmax(dim=0))
