"""Instance-segmentation mask AP (paper Tab. 4 "AP") with pycocotools ``COCOeval(iouType="segm")``.

The ground-truth instances are the *thing* segments of a COCO panoptic ground truth (crowd segments kept
as ``iscrowd`` regions COCOeval ignores matches to), the categories its thing classes — the panoptic
datasets of Tab. 4 (COCO panoptic, ADE20K panoptic) carry their instance annotation this way. detectron2's
``COCOEvaluator``, which FC-CLIP runs, reads the dataset's instances JSON instead (COCO
``instances_val2017.json``, ADE20K ``ade20k_instance_val.json``): the same objects, but there masks may
overlap, while panoptic segments do not; see docs/evaluation.md.

Predictions are the model's instances (FC-CLIP ``instance_inference``: top (query, class) pairs, thing
classes only), their mask logits resized bilinearly to the ground truth's size and binarised at 0 (as
detectron2's ``sem_seg_postprocess`` before ``> 0``), RLE-encoded per image. Category ids are class index + 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


class MaskAP:
    """Accumulates ground-truth instances and detections image by image; :meth:`compute` runs COCOeval.

    Args:
        isthing: ``{class index: thing?}`` of the panoptic vocabulary; only thing classes are categories.
    """

    def __init__(self, isthing: Mapping[int, bool]):
        self.categories = [{"id": c + 1, "name": str(c)} for c, thing in sorted(isthing.items()) if thing]
        self.thing = {c for c, thing in isthing.items() if thing}
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.detections: list[dict] = []

    def update(self, gt_seg: np.ndarray, gt_segments: Sequence[Mapping], mask_logits: torch.Tensor,
               scores: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one image.

        Args:
            gt_seg: (H, W) panoptic segment ids (0 = VOID).
            gt_segments: ``[{"id", "category_id" (class index), "iscrowd" (optional)}]``.
            mask_logits: (K, h, w) predicted instance mask logits (any resolution).
            scores, labels: (K,) detection scores and class indices.
        """
        image_id = len(self.images) + 1
        height, width = gt_seg.shape
        self.images.append({"id": image_id, "height": height, "width": width})
        for segment in gt_segments:
            if segment["category_id"] not in self.thing:
                continue
            mask = gt_seg == segment["id"]
            if not mask.any():
                continue
            self.annotations.append({
                "id": len(self.annotations) + 1, "image_id": image_id, "category_id": segment["category_id"] + 1,
                "segmentation": _rle(mask), "area": float(mask.sum()), "iscrowd": int(segment.get("iscrowd", 0)),
                "bbox": _bbox(mask)})
        if len(labels) == 0:
            return
        masks = F.interpolate(mask_logits[None].float(), size=(height, width), mode="bilinear",
                              align_corners=False)[0] > 0
        for mask, score, label in zip(masks.cpu().numpy(), scores.tolist(), labels.tolist(), strict=True):
            if label in self.thing:
                self.detections.append({"image_id": image_id, "category_id": label + 1,
                                        "segmentation": _rle(mask), "score": float(score)})

    def compute(self) -> dict[str, float]:
        """``{"mask_ap", "mask_ap50"}`` (fractions; 0 without detections; empty without GT instances)."""
        import contextlib
        import io

        from pycocotools.coco import COCO

        from model.eval.region_eval import coco_box_ap

        if not self.annotations:
            return {}
        gt = COCO()
        gt.dataset = {"images": self.images, "annotations": self.annotations, "categories": self.categories}
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
        ap, ap50 = coco_box_ap(gt, self.detections, iou_type="segm")
        return {"mask_ap": ap, "mask_ap50": ap50}


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
