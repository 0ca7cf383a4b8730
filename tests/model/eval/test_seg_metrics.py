"""mIoU / pixel accuracy and panoptic quality against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.eval.seg_metrics import PanopticQuality, SemanticConfusion, confusion_matrix, scores_from_confusion


def test_miou_ignores_255_and_classes_absent_from_prediction_and_target():
    target = torch.tensor([[0, 0, 1, 255], [1, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 3], [1, 2, 0, 0]])  # class 3 only on an ignored pixel
    scores = scores_from_confusion(confusion_matrix(pred, target, num_classes=4))
    # IoU: class 0 = 1 / (1 + 1 fp + 1 fn), class 1 = 2 / 3, class 2 = 1 / 2, class 3 excluded (empty union).
    assert scores["iou_per_class"][:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert math.isnan(scores["iou_per_class"][3])
    assert scores["miou"] == pytest.approx(0.5)
    assert scores["pixel_acc"] == pytest.approx(4 / 6)
    assert scores["macc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)


def test_a_class_predicted_but_absent_from_target_counts_as_zero_under_mmseg():
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])
    scores = scores_from_confusion(confusion_matrix(pred, target, num_classes=3), "mmseg")
    assert scores["iou_per_class"] == pytest.approx([1 / 2, 1.0, 0.0])
    assert scores["miou"] == pytest.approx(0.5)


def test_issue_hand_case_detectron2_leaves_classes_absent_from_gt_out():
    """GT [0,0,1,1,ignore], pred [0,2,1,1,1]: 0.500 with mmseg's rule, 0.750 with detectron2's (default)."""
    target = torch.tensor([0, 0, 1, 1, 255])
    pred = torch.tensor([0, 2, 1, 1, 1])
    acc = SemanticConfusion(3)
    acc.update(pred, target)
    default = acc.compute()
    assert default["miou"] == pytest.approx(0.75)
    assert default["iou_per_class"][:2] == pytest.approx([0.5, 1.0]) and math.isnan(default["iou_per_class"][2])
    mmseg = SemanticConfusion(3, convention="mmseg")
    mmseg.update(pred, target)
    assert mmseg.compute()["miou"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="convention"):
        SemanticConfusion(3, convention="voc")


def _detectron2_sem_seg_evaluate(preds: list[np.ndarray], gts: list[np.ndarray], num_classes: int,
                                 ignore_label: int = 255) -> dict[str, float]:
    """detectron2 ``SemSegEvaluator.process`` + ``evaluate`` (evaluation/sem_seg_evaluation.py), transcribed:
    a (C + 1) x (C + 1) matrix with rows = prediction, columns = GT, ignored GT mapped to C."""
    conf = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    for pred, gt in zip(preds, gts, strict=True):
        gt = gt.copy()
        gt[gt == ignore_label] = num_classes
        conf += np.bincount((num_classes + 1) * pred.reshape(-1) + gt.reshape(-1),
                            minlength=conf.size).reshape(conf.shape)
    acc = np.full(num_classes, np.nan, dtype=float)
    iou = np.full(num_classes, np.nan, dtype=float)
    tp = conf.diagonal()[:-1].astype(float)
    pos_gt = np.sum(conf[:-1, :-1], axis=0).astype(float)
    class_weights = pos_gt / np.sum(pos_gt)
    pos_pred = np.sum(conf[:-1, :-1], axis=1).astype(float)
    acc_valid = pos_gt > 0
    acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
    union = pos_gt + pos_pred - tp
    iou_valid = np.logical_and(acc_valid, union > 0)
    iou[iou_valid] = tp[iou_valid] / union[iou_valid]
    return {"miou": np.sum(iou[iou_valid]) / np.sum(iou_valid), "fwiou": np.sum(iou[iou_valid] * class_weights[iou_valid]),
            "macc": np.sum(acc[acc_valid]) / np.sum(acc_valid), "pixel_acc": np.sum(tp) / np.sum(pos_gt),
            "iou_per_class": iou}


@pytest.mark.parametrize("seed", range(4))
def test_default_equals_detectron2_sem_seg_evaluator(seed):
    """Random sets where some classes are only predicted, some only in GT, some ignored pixels."""
    rng = np.random.default_rng(seed)
    num_classes = 7
    gts = [rng.choice([0, 1, 2, 3, 255], size=(5, 6)) for _ in range(3)]  # classes 4..6 never in GT
    preds = [rng.integers(0, num_classes, size=(5, 6)) for _ in range(3)]
    acc = SemanticConfusion(num_classes)
    for pred, gt in zip(preds, gts, strict=True):
        acc.update(torch.from_numpy(pred), torch.from_numpy(gt))
    ours, reference = acc.compute(), _detectron2_sem_seg_evaluate(preds, gts, num_classes)
    for key in ("miou", "fwiou", "macc", "pixel_acc"):
        assert ours[key] == pytest.approx(reference[key], abs=1e-12), key
    np.testing.assert_allclose(np.array(ours["iou_per_class"]), reference["iou_per_class"], equal_nan=True)
    mmseg = scores_from_confusion(acc.matrix, "mmseg")["miou"]
    assert mmseg < ours["miou"]  # the only-predicted classes 4..6 each add a 0 under mmseg


def test_accumulating_images_equals_one_big_update():
    gen = torch.Generator().manual_seed(0)
    targets = [torch.randint(0, 5, (7, 9), generator=gen) for _ in range(3)]
    preds = [torch.randint(0, 5, (7, 9), generator=gen) for _ in range(3)]
    targets[1][0] = 255
    acc = SemanticConfusion(5)
    for p, t in zip(preds, targets):
        acc.update(p, t)
    whole = confusion_matrix(torch.cat(preds), torch.cat(targets), 5)
    assert torch.equal(acc.matrix, whole)
    assert acc.compute()["miou"] == scores_from_confusion(whole)["miou"]


def test_bad_labels_are_rejected():
    with pytest.raises(ValueError, match="neither class indices"):
        confusion_matrix(torch.tensor([0]), torch.tensor([7]), 3)
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 3)


A, B, C = 1, 2, 3  # category ids: A thing, B stuff, C never present


def test_panoptic_toy_pair_by_hand():
    pq = PanopticQuality()
    gt = np.array([[1, 1, 2, 2, 2, 2],
                   [1, 1, 2, 2, 2, 2],
                   [1, 1, 0, 0, 3, 3],
                   [1, 1, 0, 0, 3, 3]])
    pred = np.array([[5, 5, 6, 6, 6, 6],
                     [5, 5, 6, 6, 6, 6],
                     [5, 0, 7, 7, 7, 7],
                     [5, 0, 7, 7, 7, 7]])
    gt_info = [{"id": 1, "category_id": A}, {"id": 2, "category_id": B}, {"id": 3, "category_id": A}]
    pred_info = [{"id": 5, "category_id": A}, {"id": 6, "category_id": B}, {"id": 7, "category_id": A}]
    # (1, 5): IoU 6 / 8; (2, 6): 1; (3, 7): 4 / (8 + 4 - 4 - 4 on VOID) = 1.
    pq.update(pred, pred_info, gt, gt_info)
    gt2 = np.array([[1, 1, 0, 0], [1, 1, 0, 0]])
    pred2 = np.array([[2, 3, 4, 4], [2, 3, 4, 4]])
    # IoU exactly 0.5 is no match: gt 1 is a FN, preds 2 and 3 are FPs; pred 4 lies wholly on VOID: ignored.
    pq.update(pred2, [{"id": 2, "category_id": A}, {"id": 3, "category_id": A}, {"id": 4, "category_id": B}],
              gt2, [{"id": 1, "category_id": A}])
    assert (pq.stats[A].tp, pq.stats[A].fp, pq.stats[A].fn) == (2, 2, 1)
    assert (pq.stats[B].tp, pq.stats[B].fp, pq.stats[B].fn) == (1, 0, 0)
    result = pq.compute({A: True, B: False, C: True})
    pq_a, sq_a, rq_a = 1.75 / 3.5, 1.75 / 2, 2 / 3.5
    assert result["pq_th"] == pytest.approx(pq_a) and result["sq_th"] == pytest.approx(sq_a)
    assert result["rq_th"] == pytest.approx(rq_a)
    assert result["pq_st"] == pytest.approx(1.0)
    assert result["pq"] == pytest.approx((pq_a + 1) / 2)  # C (absent) is not averaged in
    assert result["sq"] == pytest.approx((sq_a + 1) / 2) and result["rq"] == pytest.approx((rq_a + 1) / 2)


def test_crowd_regions_are_neither_fn_nor_fp():
    pq = PanopticQuality()
    gt = np.array([[1, 1, 1, 2, 2, 2]])
    pred = np.array([[5, 5, 5, 6, 6, 6]])
    # gt 1 is a crowd of A; pred 5 (A) lies on it: ignored; pred 6 (A) matches gt 2.
    pq.update(pred, [{"id": 5, "category_id": A}, {"id": 6, "category_id": A}],
              gt, [{"id": 1, "category_id": A, "iscrowd": 1}, {"id": 2, "category_id": A}])
    assert (pq.stats[A].tp, pq.stats[A].fp, pq.stats[A].fn) == (1, 0, 0)
    assert pq.compute({A: True})["pq"] == pytest.approx(1.0)
    assert math.isnan(pq.compute({A: True})["pq_st"])


def test_undescribed_segment_ids_are_an_error():
    with pytest.raises(ValueError, match="not in segments_info"):
        PanopticQuality().update(np.array([[1, 2]]), [{"id": 1, "category_id": A}],
                                 np.array([[1, 1]]), [{"id": 1, "category_id": A}])
