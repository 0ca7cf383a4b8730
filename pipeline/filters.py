"""Pure filters of the annotation pipeline (DESIGN.md "Annotation stages", paper §3 and App. C).

* boxes: :func:`clip_boxes_to_image`, :func:`threshold_and_merge` (score threshold, then NMS
  across detectors with ``torchvision.ops.batched_nms``) on :class:`Detections`;
* captions: :func:`caption_score_filter`, :func:`apply_caption_scores`;
* foreground masks: :func:`jitter_boxes`, :func:`mask_stability`, :func:`stability_filter`.

Boxes are ``(x1, y1, x2, y2)`` pixels. Every threshold keeps the boundary value (``>=``).
Every function accepts ``N = 0`` and then returns empty outputs of the documented shape and dtype.
No model loading, no I/O: the segmenter enters :func:`mask_stability` as a callable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchvision.ops import batched_nms
from torchvision.ops import clip_boxes_to_image as _tv_clip_boxes

from data_schemas import Caption
from pipeline.masks import mask_iou

__all__ = [
    "DEFAULT_JITTER_OFFSETS",
    "Detections",
    "SegmentFn",
    "apply_caption_scores",
    "caption_score_filter",
    "clip_boxes_to_image",
    "jitter_boxes",
    "mask_stability",
    "stability_filter",
    "threshold_and_merge",
]

# The paper gives no offsets ("slightly translating ... along the diagonal"); configs override this.
DEFAULT_JITTER_OFFSETS: tuple[float, ...] = (2.0, 4.0, 8.0)

SegmentFn = Callable[[Any, np.ndarray], np.ndarray]
"""``segment(image, boxes_xyxy (M, 4) float32) -> masks (M, H, W) bool``, one batched call."""


def _cpu_float32(values: Any) -> torch.Tensor:
    """A float32 CPU tensor; read-only numpy arrays (e.g. from Ray's object store) are copied first."""
    if isinstance(values, np.ndarray) and not values.flags.writeable:
        values = values.copy()
    return torch.as_tensor(values, dtype=torch.float32, device="cpu").detach()


@dataclass
class Detections:
    """Boxes of one image from one or more detectors, all fields of the same length ``N``.

    Attributes:
        boxes: ``(N, 4)`` float32 tensor, ``(x1, y1, x2, y2)`` pixels.
        scores: ``(N,)`` float32 tensor.
        labels: ``N`` class names.
        sources: ``N`` detector names: which detector produced each box (provenance).

    Array-likes are converted to float32 CPU tensors; mismatched lengths raise ``ValueError``.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: list[str]
    sources: list[str]

    def __post_init__(self) -> None:
        self.boxes = _cpu_float32(self.boxes).reshape(-1, 4)
        self.scores = _cpu_float32(self.scores).reshape(-1)
        self.labels = list(self.labels)
        self.sources = list(self.sources)
        lengths = {
            "boxes": self.boxes.shape[0],
            "scores": self.scores.shape[0],
            "labels": len(self.labels),
            "sources": len(self.sources),
        }
        if len(set(lengths.values())) != 1:
            raise ValueError(f"Detections fields differ in length: {lengths}")

    def __len__(self) -> int:
        return self.boxes.shape[0]

    @classmethod
    def from_detector(cls, boxes: Any, scores: Any, labels: Sequence[str], source: str) -> Detections:
        """Detections of a single detector: ``source`` is repeated for every box."""
        return cls(boxes=boxes, scores=scores, labels=list(labels), sources=[source] * len(labels))

    @classmethod
    def empty(cls) -> Detections:
        return cls(boxes=torch.zeros(0, 4), scores=torch.zeros(0), labels=[], sources=[])

    @classmethod
    def cat(cls, parts: Sequence[Detections]) -> Detections:
        """Concatenate in order; ``[]`` gives empty Detections."""
        if not parts:
            return cls.empty()
        return cls(
            boxes=torch.cat([p.boxes for p in parts]),
            scores=torch.cat([p.scores for p in parts]),
            labels=[label for p in parts for label in p.labels],
            sources=[source for p in parts for source in p.sources],
        )

    def take(self, index: torch.Tensor) -> Detections:
        """Select by a bool mask ``(N,)`` or integer indices ``(M,)``, keeping every field aligned."""
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            index = torch.nonzero(index).reshape(-1)
        ids = index.tolist()
        return Detections(
            boxes=self.boxes[index],
            scores=self.scores[index],
            labels=[self.labels[i] for i in ids],
            sources=[self.sources[i] for i in ids],
        )


def clip_boxes_to_image(
    boxes_xyxy: np.ndarray | torch.Tensor, width: int, height: int, min_size: float = 0.0
) -> tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]:
    """Clip boxes to ``[0, width] × [0, height]`` and flag those that keep a usable extent.

    Args:
        boxes_xyxy: ``(N, 4)`` float boxes (numpy array or tensor).
        width, height: image size in pixels.
        min_size: a clipped box is valid when both its sides are strictly greater than this.

    Returns:
        ``clipped`` ``(N, 4)`` (same dtype) and ``valid`` ``(N,)`` bool, both of the input's kind
        (numpy in, numpy out; tensor in, tensor out). Boxes with NaN coordinates are invalid.
    """
    is_numpy = not isinstance(boxes_xyxy, torch.Tensor)
    boxes = torch.as_tensor(np.asarray(boxes_xyxy) if is_numpy else boxes_xyxy).reshape(-1, 4)
    if not boxes.is_floating_point():
        boxes = boxes.to(torch.float32)
    clipped = _tv_clip_boxes(boxes, (height, width))
    widths, heights = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    valid = (widths > min_size) & (heights > min_size)
    if is_numpy:
        return clipped.numpy(), valid.numpy()
    return clipped, valid


def threshold_and_merge(
    detections: Sequence[Detections],
    score_threshold: float = 0.3,
    iou_threshold: float = 0.5,
    class_aware: bool = True,
) -> Detections:
    """Merge the boxes of several detectors: drop low scores, then NMS across detectors.

    Args:
        detections: one :class:`Detections` per detector (any number, each may be empty).
        score_threshold: boxes with ``score >= score_threshold`` survive (boundary kept), compared
            in float32, the dtype of ``Detections.scores``.
        iou_threshold: NMS suppresses a box whose IoU with a higher-ranked kept box is ``>`` this
            (``torchvision.ops.batched_nms`` semantics).
        class_aware: NMS only between boxes of the same label string; otherwise all boxes compete.

    Returns:
        Surviving detections with their ``sources``, sorted by score descending. Ties are broken by
        input order (detector order in ``detections``, then box order), both in the output order
        and in which of two equal-score overlapping boxes survives.
    """
    merged = Detections.cat(detections)
    threshold = torch.tensor(score_threshold, dtype=merged.scores.dtype)
    merged = merged.take(merged.scores >= threshold)
    if len(merged) == 0:
        return merged
    ranks = _tie_free_ranks(merged.scores)
    keep = batched_nms(merged.boxes.double(), ranks, _groups(merged, class_aware), iou_threshold)
    return merged.take(keep)


def _tie_free_ranks(scores: torch.Tensor) -> torch.Tensor:
    # NMS on distinct rank values instead of raw scores: equal scores would leave the winner to the
    # sort inside the NMS kernel; ranks make "higher score, then earlier input" explicit.
    order = np.lexsort((np.arange(len(scores)), -scores.numpy().astype(np.float64)))
    ranks = torch.empty(len(scores), dtype=torch.float64)
    ranks[torch.from_numpy(order)] = torch.arange(len(scores), 0, -1, dtype=torch.float64)
    return ranks


def _groups(dets: Detections, class_aware: bool) -> torch.Tensor:
    if not class_aware:
        return torch.zeros(len(dets), dtype=torch.int64)
    label_ids = {label: i for i, label in enumerate(sorted(set(dets.labels)))}
    return torch.tensor([label_ids[label] for label in dets.labels], dtype=torch.int64)


def caption_score_filter(scores: Sequence[float] | np.ndarray, threshold: float) -> np.ndarray:
    """Keep captions whose image-text score is ``>= threshold``.

    Args:
        scores: ``(N,)`` CLIP image-text similarities.

    Returns:
        ``(N,)`` bool array. NaN scores are not kept.
    """
    return np.asarray(scores, dtype=np.float64).reshape(-1) >= threshold


def apply_caption_scores(
    captions: Sequence[Caption], scores: Sequence[float] | np.ndarray, threshold: float
) -> list[Caption]:
    """New captions with ``clip_score`` set to ``scores[i]`` and ``kept`` from :func:`caption_score_filter`."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(captions) != len(scores):
        raise ValueError(f"{len(captions)} captions but {len(scores)} scores")
    kept = caption_score_filter(scores, threshold)
    return [
        caption.model_copy(update={"clip_score": float(score), "kept": bool(keep)})
        for caption, score, keep in zip(captions, scores, kept, strict=True)
    ]


def jitter_boxes(
    box_xyxy: Sequence[float] | np.ndarray,
    offsets: Sequence[float],
    width: int | None = None,
    height: int | None = None,
) -> np.ndarray:
    """Translate a box along its diagonal: for each ``k`` in ``offsets``, by ``+k`` then by ``-k``.

    A shift by ``d`` adds ``d`` to all four coordinates, i.e. moves the box by ``(d, d)`` in the
    ``(x, y)`` direction, keeping its size. With ``width`` and ``height`` given, the shifted boxes
    are clipped to ``[0, width] × [0, height]`` (a clipped box may shrink).

    Args:
        box_xyxy: ``(4,)`` box ``(x1, y1, x2, y2)``.
        offsets: ``K0`` positive shifts in pixels.

    Returns:
        ``(2 * K0, 4)`` float32 array, rows ``[+k0, -k0, +k1, -k1, ...]``.
    """
    box = np.asarray(box_xyxy, dtype=np.float64).reshape(4)
    steps = np.asarray(offsets, dtype=np.float64).reshape(-1)
    if np.any(~(steps > 0)):
        raise ValueError(f"jitter offsets must be positive pixels, got {list(offsets)}")
    if (width is None) != (height is None):
        raise ValueError("give both width and height to clip, or neither")
    shifts = np.stack([steps, -steps], axis=1).reshape(-1, 1)
    jittered = box[None, :] + shifts
    if width is not None:
        jittered[:, 0::2] = np.clip(jittered[:, 0::2], 0, width)
        jittered[:, 1::2] = np.clip(jittered[:, 1::2], 0, height)
    return jittered.astype(np.float32)


def mask_stability(
    image: Any,
    boxes_xyxy: np.ndarray | torch.Tensor,
    masks: np.ndarray,
    segment: SegmentFn,
    offsets: Sequence[float] = DEFAULT_JITTER_OFFSETS,
) -> np.ndarray:
    """Stability of each mask under box jitter (paper App. C).

    For box ``i`` with mask ``masks[i]``: jitter the box with :func:`jitter_boxes` (clipped to the
    image), segment every jittered box, and average the IoU (:func:`~pipeline.masks.mask_iou`) of
    ``masks[i]`` with each resulting mask. ``segment`` is called once with all ``N * K`` jittered
    boxes (box-major: rows ``i*K .. i*K+K-1`` belong to box ``i``); with ``N = 0`` it is not called.

    Args:
        image: passed unchanged to ``segment``.
        boxes_xyxy: ``(N, 4)`` prompt boxes that produced ``masks``.
        masks: ``(N, H, W)`` bool original masks.
        segment: ``segment(image, boxes (M, 4) float32) -> (M, H, W) bool``.
        offsets: positive diagonal shifts in pixels; ``K = 2 * len(offsets)``.

    Returns:
        ``(N,)`` float64 stability in ``[0, 1]``.
    """
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[0] != boxes.shape[0]:
        raise ValueError(f"need masks (N, H, W) for boxes (N, 4), got {masks.shape} and {boxes.shape}")
    if len(offsets) == 0:
        raise ValueError("mask_stability needs at least one jitter offset")
    n, height, width = masks.shape
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    jittered = np.concatenate([jitter_boxes(box, offsets, width, height) for box in boxes])
    jittered_masks = np.asarray(segment(image, jittered))
    k = jittered.shape[0] // n
    if jittered_masks.shape != (n * k, height, width):
        raise ValueError(f"segment returned {jittered_masks.shape}, expected {(n * k, height, width)}")
    jittered_masks = jittered_masks.reshape(n, k, height, width)
    ious = np.stack([mask_iou(masks, jittered_masks[:, j]) for j in range(k)], axis=1)
    return ious.mean(axis=1)


def stability_filter(stability: Sequence[float] | np.ndarray, threshold: float) -> np.ndarray:
    """Keep masks with ``stability >= threshold``: ``(N,)`` float in, ``(N,)`` bool out."""
    return np.asarray(stability, dtype=np.float64).reshape(-1) >= threshold
