"""Segmentation metrics: confusion-matrix mIoU / pixel accuracy, and COCO panoptic quality (PQ, SQ, RQ).

Both are exact accumulators (integer counts), so results do not depend on how images are batched.

- :class:`SemanticConfusion` — pixels whose target is ``ignore_index`` (255) are skipped;
  IoU_c = TP / (TP + FP + FN). Which classes enter the mean is the *convention* (:data:`MIOU_CONVENTIONS`):

  - ``"detectron2"`` (default; detectron2 ``SemSegEvaluator``, which Mask2Former, FC-CLIP and so the
    paper's Tab. 4-5 use): only classes present in the ground truth of the whole set
    (``iou_valid = acc_valid & (union > 0)``); a class only predicted costs its false-positive
    pixels in the other classes' IoU but is not averaged as 0.
  - ``"mmseg"`` (mmseg / torchmetrics ``MulticlassJaccardIndex``): every class with a non-empty
    union, so a class predicted but absent from the ground truth counts IoU 0.

  ``macc`` (mean class accuracy) averages over the classes present in the ground truth in both.
- :class:`PanopticQuality` — the COCO panoptic definition of ``panopticapi.evaluation.pq_compute``:
  a predicted and a ground-truth segment of the same category match when IoU > 0.5, where the union
  leaves out the prediction's pixels on VOID; unmatched predictions covering more than half VOID (or
  a crowd region of their category) are not false positives; crowd ground truth is never a false
  negative. PQ = sum IoU(TP) / (TP + FP/2 + FN/2) per category, then averaged over the categories
  with TP + FP + FN > 0 (SQ and RQ likewise; a category's SQ is 0 when it has no TP).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = 255
VOID = 0
MIOU_CONVENTIONS = ("detectron2", "mmseg")
_OFFSET = 1 << 32  # pairs (gt id, pred id) packed into one int64; segment ids must stay below it


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(C, C) int64 counts, rows = target class, columns = predicted class.

    Args:
        pred: (...) int predicted class per pixel, values in [0, C).
        target: (...) int, same shape, values in [0, C) or ``ignore_index``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        bad = sorted(set(target[(target < 0) | (target >= num_classes)].unique().tolist()))
        raise ValueError(f"target values {bad[:5]} are neither class indices in [0, {num_classes}) nor {ignore_index}")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predictions must lie in [0, {num_classes})")
    return torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def scores_from_confusion(cm: torch.Tensor, convention: str = "detectron2") -> dict[str, float | list[float]]:
    """mIoU, frequency-weighted IoU, pixel accuracy and mean class accuracy from a (C, C) confusion matrix.

    Args:
        cm: (C, C) counts, rows = target class, columns = predicted class.
        convention: which classes enter ``miou`` / ``fwiou`` (:data:`MIOU_CONVENTIONS`, module docstring).

    Returns:
        ``{"miou", "fwiou", "pixel_acc", "macc", "iou_per_class"}``; fractions in [0, 1]; a class left
        out of the mean has IoU NaN in ``iou_per_class``. NaN overall when nothing was counted.
    """
    if convention not in MIOU_CONVENTIONS:
        raise ValueError(f"mIoU convention {convention!r} not in {MIOU_CONVENTIONS}")
    cm = cm.double()
    tp = cm.diag()
    support = cm.sum(1)
    union = cm.sum(0) + support - tp
    valid = (union > 0) & (support > 0) if convention == "detectron2" else union > 0
    nan = torch.full_like(tp, float("nan"))
    iou = torch.where(valid, tp / union.clamp(min=1), nan)
    class_acc = torch.where(support > 0, tp / support.clamp(min=1), nan)
    total = cm.sum()
    weights = support / total if total > 0 else support
    return {
        "miou": float(iou.nanmean()),
        "fwiou": float((iou[valid] * weights[valid]).sum()) if total > 0 else float("nan"),
        "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
        "macc": float(class_acc.nanmean()),
        "iou_per_class": iou.tolist(),
    }


class SemanticConfusion:
    """Accumulates a confusion matrix over images; :meth:`compute` gives :func:`scores_from_confusion`."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, convention: str = "detectron2"):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if convention not in MIOU_CONVENTIONS:
            raise ValueError(f"mIoU convention {convention!r} not in {MIOU_CONVENTIONS}")
        self.num_classes, self.ignore_index, self.convention = num_classes, ignore_index, convention
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one image (or a batch): (...) predicted classes and (...) targets of the same shape."""
        self.matrix += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def compute(self) -> dict[str, float | list[float]]:
        return scores_from_confusion(self.matrix, self.convention)


@dataclass
class _CategoryStat:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou: float = 0.0


def _areas(seg: np.ndarray) -> dict[int, int]:
    ids, counts = np.unique(seg, return_counts=True)
    return dict(zip(ids.tolist(), counts.tolist(), strict=True))


def _segments_by_id(segments: Sequence[Mapping], areas: Mapping[int, int], what: str) -> dict[int, dict]:
    """Segments that have pixels, keyed by id; every non-void id in the map must be described."""
    by_id = {int(s["id"]): dict(s) for s in segments}
    if VOID in by_id:
        raise ValueError(f"{what} segment id {VOID} is reserved for VOID")
    unknown = sorted(set(areas) - set(by_id) - {VOID})
    if unknown:
        raise ValueError(f"{what} segment ids {unknown[:5]} are in the map but not in segments_info")
    for seg_id, info in by_id.items():
        info["area"] = areas.get(seg_id, 0)
    return {seg_id: info for seg_id, info in by_id.items() if info["area"] > 0}


class PanopticQuality:
    """COCO panoptic PQ / SQ / RQ accumulated over images (see the module docstring)."""

    def __init__(self):
        self.stats: dict[int, _CategoryStat] = defaultdict(_CategoryStat)

    def update(self, pred_seg: np.ndarray, pred_segments: Sequence[Mapping], gt_seg: np.ndarray,
               gt_segments: Sequence[Mapping]) -> None:
        """Add one image.

        Args:
            pred_seg, gt_seg: (H, W) int segment ids, 0 = VOID.
            pred_segments: ``[{"id", "category_id"}, ...]`` for the ids in ``pred_seg``.
            gt_segments: ``[{"id", "category_id", "iscrowd" (optional, 0)}, ...]`` for ``gt_seg``.
        """
        pred_seg, gt_seg = np.asarray(pred_seg, dtype=np.int64), np.asarray(gt_seg, dtype=np.int64)
        if pred_seg.shape != gt_seg.shape:
            raise ValueError(f"pred {pred_seg.shape} and gt {gt_seg.shape} segment maps differ in shape")
        preds = _segments_by_id(pred_segments, _areas(pred_seg), "predicted")
        gts = _segments_by_id(gt_segments, _areas(gt_seg), "ground-truth")
        pairs = _areas(gt_seg * _OFFSET + pred_seg)
        overlap = {(k // _OFFSET, k % _OFFSET): v for k, v in pairs.items()}
        gt_matched, pred_matched = set(), set()
        for (gt_id, pred_id), inter in overlap.items():
            if gt_id not in gts or pred_id not in preds:
                continue
            gt, pred = gts[gt_id], preds[pred_id]
            if gt.get("iscrowd", 0) or gt["category_id"] != pred["category_id"]:
                continue
            union = pred["area"] + gt["area"] - inter - overlap.get((VOID, pred_id), 0)
            iou = inter / union
            if iou > 0.5:
                stat = self.stats[gt["category_id"]]
                stat.tp += 1
                stat.iou += iou
                gt_matched.add(gt_id)
                pred_matched.add(pred_id)
        crowd_by_category = {}
        for gt_id, gt in gts.items():
            if gt.get("iscrowd", 0):
                crowd_by_category[gt["category_id"]] = gt_id
            elif gt_id not in gt_matched:
                self.stats[gt["category_id"]].fn += 1
        for pred_id, pred in preds.items():
            if pred_id in pred_matched:
                continue
            ignored = overlap.get((VOID, pred_id), 0)
            if pred["category_id"] in crowd_by_category:
                ignored += overlap.get((crowd_by_category[pred["category_id"]], pred_id), 0)
            if ignored / pred["area"] > 0.5:
                continue
            self.stats[pred["category_id"]].fp += 1

    def _average(self, category_ids: Sequence[int]) -> dict[str, float]:
        pq = sq = rq = 0.0
        n = 0
        for cat in category_ids:
            stat = self.stats.get(cat)
            if stat is None or stat.tp + stat.fp + stat.fn == 0:
                continue
            n += 1
            denominator = stat.tp + 0.5 * stat.fp + 0.5 * stat.fn
            pq += stat.iou / denominator
            sq += stat.iou / stat.tp if stat.tp else 0.0
            rq += stat.tp / denominator
        if n == 0:
            return {"pq": float("nan"), "sq": float("nan"), "rq": float("nan"), "n": 0}
        return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}

    def compute(self, isthing: Mapping[int, bool]) -> dict[str, float]:
        """``{"pq", "sq", "rq", "pq_th", "sq_th", "rq_th", "pq_st", "sq_st", "rq_st"}`` (fractions, NaN for a
        group with no category present) over the categories of ``isthing`` (category id -> thing?)."""
        result = {}
        groups = {"": list(isthing), "_th": [c for c, t in isthing.items() if t],
                  "_st": [c for c, t in isthing.items() if not t]}
        for suffix, ids in groups.items():
            avg = self._average(ids)
            result.update({f"{k}{suffix}": avg[k] for k in ("pq", "sq", "rq")})
        return result
