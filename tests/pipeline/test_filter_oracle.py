"""Oracle check of the filters on digit scenes: detectors = ground truth + noise, segmenter = ground
truth masks for boxes on a digit and box-following blobs elsewhere. The merge must remove the
low-score noise and the cross-detector duplicates; the jitter filter must keep the digits' masks
and drop the masks of boxes on background. Precision / recall of each filter are asserted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from annotators import DetectorOutput, SegmentOutput
from data_schemas import ImageLimits, MergeConfig, SourceConfig, StabilityConfig
from pipeline.filters import jittered_mask_stability
from pipeline.ingest import ingest_item
from pipeline.masks import decode_mask
from pipeline.sample_data import generate_sample
from pipeline.sources.registry import build_source
from pipeline.stages import DetectStage, MergeStage, SegmentStage, StabilityStage, run_stage


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle")
    generate_sample(root, n=30, seed=3)
    source = build_source(SourceConfig(kind="coco", annotations=root / "annotations" / "instances_train.json"))
    items = [ingest_item(item, "coco", ImageLimits()) for item in source.read(source.list_refs())]
    truth = {}
    for item in items:
        regions = item.record.regions
        truth[item.record.key] = (
            np.array([r.box_xyxy for r in regions], np.float32),
            [r.label for r in regions],
            np.stack([decode_mask(r.mask.rle) for r in regions]),
        )
        item.record.regions = []  # the detectors have to find them again
    return items, truth


class Oracle:
    name, version = "oracle", "test"

    def __init__(self, fn):
        self.fn = fn

    def load(self):
        pass

    def __call__(self, images, *rest):
        return [self.fn(i, im, *args) for i, (im, *args) in enumerate(zip(images, *rest))]


def _noise_boxes(rng, width, height, n, avoid, side=(12, 24)):
    """``n`` random square boxes that do not overlap any box in ``avoid`` (background only)."""
    boxes = []
    while len(boxes) < n:
        s = rng.uniform(*side)
        x1, y1 = rng.uniform(0, width - s), rng.uniform(0, height - s)
        box = np.array([x1, y1, x1 + s, y1 + s], np.float32)
        apart = (box[2] <= avoid[:, 0]) | (box[0] >= avoid[:, 2]) | (box[3] <= avoid[:, 1]) | (box[1] >= avoid[:, 3])
        if apart.all():
            boxes.append(box)
    return np.stack(boxes)


def _match(pred_boxes, true_boxes, iou=0.7):
    """(matched predictions (P,) bool, found truths (T,) bool) by IoU."""
    if len(pred_boxes) == 0 or len(true_boxes) == 0:
        return np.zeros(len(pred_boxes), bool), np.zeros(len(true_boxes), bool)
    ious = box_iou(torch.as_tensor(pred_boxes), torch.as_tensor(true_boxes)).numpy()
    return ious.max(axis=1) >= iou, ious.max(axis=0) >= iou


def test_merge_and_stability_filters_against_ground_truth(scenes):
    items, truth = scenes
    keys = [item.record.key for item in items]
    rng = np.random.default_rng(0)
    fake_fp = {}

    def detector_a(i, image):
        boxes, labels, _ = truth[keys[i]]
        noise = _noise_boxes(rng, image.width, image.height, 4, boxes)
        return DetectorOutput(np.vstack([boxes, noise]), [0.9] * len(boxes) + list(rng.uniform(0.05, 0.29, 4)),
                              labels + ["noise"] * 4)

    def detector_b(i, image):
        boxes, labels, _ = truth[keys[i]]
        shifted = np.clip(boxes + rng.uniform(-1.5, 1.5, boxes.shape), 0, None).astype(np.float32)
        confident_fp = _noise_boxes(rng, image.width, image.height, 1, boxes)  # a high-score box on background
        fake_fp[keys[i]] = confident_fp
        return DetectorOutput(np.vstack([shifted, confident_fp]), [0.8] * len(boxes) + [0.6], labels + ["seven"])

    def segmenter(i, image, boxes, jittered=None):
        true_boxes, _, true_masks = truth[keys[i]]
        masks = np.zeros((len(boxes), image.height, image.width), bool)
        overlap = box_iou(torch.as_tensor(boxes), torch.as_tensor(true_boxes)).numpy().reshape(len(boxes), -1)
        for mask, box, ious in zip(masks, boxes, overlap):
            if ious.size and ious.max() >= 0.3:  # SAM finds the digit under the box, wherever the box moved a bit
                mask[:] = true_masks[ious.argmax()]
            else:  # nothing there: the mask follows the box
                x1, y1, x2, y2 = np.round(box).astype(int)
                mask[y1:y2, x1:x2] = True
        stability = None
        if jittered is not None:
            stability = jittered_mask_stability(image, masks, jittered, lambda im, b: segmenter(i, im, b).masks)
        return SegmentOutput(masks, np.ones(len(boxes), np.float32), stability)

    seg, config = Oracle(segmenter), StabilityConfig()  # the defaults: 0.05 / 0.1 / 0.15 of the diagonal, 0.8
    # Both detectors speak one vocabulary (digit words), so the merge is class-aware: occluded digits of
    # different classes overlap by IoU > 0.5 and a class-agnostic NMS (the default) would drop ~4 % of them.
    merge = MergeStage("merge", config=MergeConfig(class_aware=True))
    for stage in (DetectStage("detector_a", Oracle(detector_a), source="a"),
                  DetectStage("detector_b", Oracle(detector_b), source="b"), merge,
                  SegmentStage("segmenter", seg, stability=config), StabilityStage("stability", config=config)):
        run_stage(stage, items)

    n_true = n_found = n_pred = n_pred_ok = 0
    masks_on_digits = masks_on_fp = digits = fps = 0
    for item in items:
        assert item.error is None
        true_boxes, _, _ = truth[item.record.key]
        regions = item.record.regions
        pred = np.array([r.box_xyxy for r in regions], np.float32).reshape(-1, 4)
        on_digit, found = _match(pred, true_boxes)
        on_fp, _ = _match(pred, fake_fp[item.record.key])
        n_true, n_found = n_true + len(true_boxes), n_found + found.sum()
        n_pred, n_pred_ok = n_pred + (~on_fp).sum(), n_pred_ok + (on_digit & ~on_fp).sum()
        for region, digit, fp in zip(regions, on_digit, on_fp):
            digits, fps = digits + digit, fps + fp
            masks_on_digits += digit and region.mask is not None
            masks_on_fp += fp and region.mask is not None
    # Merge: every digit found once (recall), no noise or duplicate survives (precision).
    assert n_true > 40
    assert n_found / n_true >= 0.98
    assert n_pred_ok / n_pred >= 0.98
    # Stability: digit masks kept, masks of boxes on background dropped.
    assert fps == len(items)
    assert masks_on_digits / digits >= 0.95
    assert masks_on_fp / fps <= 0.05
