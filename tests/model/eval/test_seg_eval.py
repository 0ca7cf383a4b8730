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


def test_mask_ap_of_instances_by_hand():
    from model.eval.mask_ap import MaskAP

    gt = np.zeros((4, 5), dtype=np.int64)
    gt[:2, :] = 1  # segment 1: class 0 (thing), 10 pixels
    gt[2:, :] = 2  # segment 2: class 1 (stuff): not an instance category
    logits = torch.full((2, 4, 5), -5.0)
    logits[0, :2, :3] = 5.0  # 6 of the 10 pixels: IoU 0.6, matched at IoU thresholds 0.50, 0.55, 0.60
    logits[1, 2:, :] = 5.0   # a stuff detection: dropped
    ap = MaskAP({0: True, 1: False})
    ap.update(gt, [{"id": 1, "category_id": 0}, {"id": 2, "category_id": 1}], logits, torch.tensor([0.9, 0.8]),
              torch.tensor([0, 1]))
    assert len(ap.annotations) == 1 and len(ap.detections) == 1
    assert ap.compute() == pytest.approx({"mask_ap": 0.3, "mask_ap50": 1.0})
    assert MaskAP({0: False}).compute() == {}


def test_mask_ap_of_an_instance_model(colour_dataset):
    """Instances cut from the exact panoptic baseline: mask AP 1; with every label shifted: 0."""
    class WithInstances(torch.nn.Module):
        def __init__(self, shift=0):
            super().__init__()
            self.umg, self.shift = PixelColourModel(), shift
            self.base = TrainingFreeSegmenter(self.umg, min_area=0)

        def segment_semantic(self, images, text_emb):
            return self.base.segment_semantic(images, text_emb)

        def segment_panoptic(self, images, text_emb, thing_mask):
            return self.base.segment_panoptic(images, text_emb, thing_mask)

        def segment_instances(self, images, text_emb, thing_mask):
            out = []
            for seg, segments in self.segment_panoptic(images, text_emb, thing_mask):
                things = [s for s in segments if s["isthing"]]
                logits = torch.stack([torch.where(seg == s["id"], 10.0, -10.0) for s in things])
                labels = torch.tensor([(s["category_id"] + self.shift) % len(CLASSES) for s in things])
                out.append((logits, torch.ones(len(things)), labels))
            return out

    exact = _run(colour_dataset, model=WithInstances(), panoptic=colour_dataset / "panoptic.json")["metrics"]
    assert exact["mask_ap"] == pytest.approx(1.0) and exact["pq_th"] == pytest.approx(1.0)
    wrong = _run(colour_dataset, model=WithInstances(shift=1), panoptic=colour_dataset / "panoptic.json")["metrics"]
    assert wrong["mask_ap"] == pytest.approx(0.0)


def test_maskclip_dense_features_option(colour_dataset):
    with pytest.raises(ValueError, match="dense_features"):
        TrainingFreeSegmenter(PixelColourModel(), dense_features="clipsurgery")
    result = _run(colour_dataset, dense_features="tokens")
    assert result["dense_features"] == "tokens" and result["miou_convention"] == "detectron2"
