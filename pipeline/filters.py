"""Pure filters of the annotation pipeline (DESIGN.md "Annotation stages", paper §3 and App. C).

* boxes: :func:`clip_boxes_to_image`, :func:`threshold_and_merge` (score threshold, then NMS
  across detectors with ``torchvision.ops.batched_nms``, class-agnostic or in a shared vocabulary:
  :func:`map_labels`) on :class:`Detections`;
* captions: :func:`caption_score_filter`, :func:`apply_caption_scores`;
* foreground masks: :func:`jitter_boxes`, :func:`jitter_stability`, :func:`mask_stability`,
  :func:`stability_filter`.

Boxes are ``(x1, y1, x2, y2)`` pixels. Every threshold keeps the boundary value (``>=``).
Every function accepts ``N = 0`` and then returns empty outputs of the documented shape and dtype.
No model loading, no I/O: the segmenter enters :func:`mask_stability` as a callable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchvision.ops import batched_nms
from torchvision.ops import clip_boxes_to_image as _tv_clip_boxes

from data_schemas import Caption
from pipeline.masks import mask_iou

__all__ = [
    "DEFAULT_JITTER_FRACTIONS",
    "Detections",
    "SegmentFn",
    "apply_caption_scores",
    "caption_score_filter",
    "clip_boxes_to_image",
    "jitter_boxes",
    "jitter_stability",
    "map_labels",
    "normalize_label",
    "jittered_mask_stability",
    "mask_stability",
    "stability_filter",
    "threshold_and_merge",
]

# The paper gives no offsets ("slightly translating ... along the diagonal"): ours, as fractions of the
# box diagonal so the check is the same for small and large boxes. A mask that merely follows its box
# scores mean((1-f)^2 / (2-(1-f)^2)) = 0.69 with these, clearly under the default threshold 0.8.
DEFAULT_JITTER_FRACTIONS: tuple[float, ...] = (0.05, 0.1, 0.15)

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


def normalize_label(label: str) -> str:
    """A detector label as a vocabulary key: lower case, ``_`` / ``-`` as spaces, whitespace collapsed
    (``"Traffic_Light"`` and ``"traffic light"`` are one class)."""
    return " ".join(label.lower().replace("_", " ").replace("-", " ").split())


def map_labels(labels: Sequence[str], label_map: Mapping[str, str]) -> list[str]:
    """Labels of several detectors in one shared vocabulary: ``label_map[normalize_label(l)]``, else the
    normalised label. ``label_map`` keys are normalised too (``{"Automobile": "car"}`` maps ``"automobile"``)."""
    table = {normalize_label(k): v for k, v in label_map.items()}
    return [table.get(key, key) for key in map(normalize_label, labels)]


def threshold_and_merge(
    detections: Sequence[Detections],
    score_threshold: float = 0.3,
    iou_threshold: float = 0.5,
    class_aware: bool = False,
    label_map: Mapping[str, str] | None = None,
) -> Detections:
    """Merge the boxes of several detectors: drop low scores, then NMS across detectors.

    Detectors trained on different vocabularies (BigDetection 600 classes, V3Det 13k) name one object
    differently, so class-aware NMS on raw label strings keeps it once per synonym: the default is
    class-agnostic, or give ``label_map`` to merge class-aware in a shared vocabulary.

    Args:
        detections: one :class:`Detections` per detector (any number, each may be empty).
        score_threshold: boxes with ``score >= score_threshold`` survive (boundary kept), compared
            in float32, the dtype of ``Detections.scores``.
        iou_threshold: NMS suppresses a box whose IoU with a higher-ranked kept box is ``>`` this
            (``torchvision.ops.batched_nms`` semantics).
        class_aware: NMS only between boxes of the same label; otherwise all boxes compete.
        label_map: synonym -> shared-vocabulary label (:func:`map_labels`); the output carries the
            mapped labels. Without it, class-aware NMS compares the label strings as given.

    Returns:
        Surviving detections with their ``sources``, sorted by score descending. Ties are broken by
        input order (detector order in ``detections``, then box order), both in the output order
        and in which of two equal-score overlapping boxes survives.
    """
    merged = Detections.cat(detections)
    if label_map is not None:
        merged.labels = map_labels(merged.labels, label_map)
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
    boxes_xyxy: Sequence[float] | np.ndarray,
    fractions: Sequence[float],
    width: int | None = None,
    height: int | None = None,
) -> np.ndarray:
    """Translate boxes along their own diagonal by ``±f`` of its length, for each ``f`` in ``fractions``.

    A box ``w × h`` moved by ``t`` times its diagonal along that diagonal moves by ``(t·w, t·h)``:
    the shift scales with the box, so a mask that merely follows its box scores the same IoU at every
    box size (paper App. C: "slightly translating the box along its diagonal").

    Borders: with ``width`` and ``height`` given, each shift is limited per axis so the box stays
    inside ``[0, width] × [0, height]`` with its size kept (a box touching the right edge still moves
    vertically); a box that already sticks out on an axis does not move on it, and the result is clipped.

    Args:
        boxes_xyxy: ``(..., 4)`` boxes ``(x1, y1, x2, y2)``, e.g. ``(4,)`` or ``(N, 4)``.
        fractions: ``K0`` fractions of the diagonal, each in ``(0, 1)``.

    Returns:
        ``(..., 2 * K0, 4)`` float32 array, per box rows ``[+f0, -f0, +f1, -f1, ...]``.
    """
    boxes = np.asarray(boxes_xyxy, dtype=np.float64)
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"boxes must have shape (..., 4), got {boxes.shape}")
    steps = np.asarray(fractions, dtype=np.float64).reshape(-1)
    if np.any(~((steps > 0) & (steps < 1))):
        raise ValueError(f"jitter fractions of the box diagonal must be in (0, 1), got {list(fractions)}")
    if (width is None) != (height is None):
        raise ValueError("give both width and height to clip, or neither")
    lead = boxes.shape[:-1]
    flat = boxes.reshape(-1, 1, 4)
    signed = np.stack([steps, -steps], axis=1).reshape(1, -1)  # (1, 2K)
    sizes = flat[..., 2:] - flat[..., :2]  # (N, 1, 2): w, h
    shift = signed[..., None] * sizes  # (N, 2K, 2): (dx, dy) = t·(w, h)
    if width is not None:
        limits = np.array([width, height], dtype=np.float64)
        room_lo = np.minimum(-flat[..., :2], 0.0)  # how far the box may move left/up (<= 0)
        room_hi = np.maximum(limits - flat[..., 2:], 0.0)  # ... right/down (>= 0)
        shift = np.clip(shift, room_lo, room_hi)
    jittered = flat + np.concatenate([shift, shift], axis=-1)
    if width is not None:
        jittered[..., 0::2] = np.clip(jittered[..., 0::2], 0, width)
        jittered[..., 1::2] = np.clip(jittered[..., 1::2], 0, height)
    return jittered.reshape(*lead, 2 * len(steps), 4).astype(np.float32)


def jitter_stability(masks: np.ndarray, jittered_masks: np.ndarray) -> np.ndarray:
    """Mean IoU of each mask with the masks of its jittered boxes (:func:`~pipeline.masks.mask_iou`).

    Args:
        masks: ``(N, H, W)`` bool masks of the original boxes.
        jittered_masks: ``(N, K, H, W)`` bool masks of each box's ``K`` jittered copies.

    Returns:
        ``(N,)`` float64 in ``[0, 1]``.
    """
    masks, jittered_masks = np.asarray(masks), np.asarray(jittered_masks)
    if jittered_masks.ndim != 4 or jittered_masks.shape[:1] + jittered_masks.shape[2:] != masks.shape:
        raise ValueError(f"jittered masks {jittered_masks.shape} do not match masks {masks.shape} as (N, K, H, W)")
    n, k = jittered_masks.shape[:2]
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    ious = np.stack([mask_iou(masks, jittered_masks[:, j]) for j in range(k)], axis=1)
    return ious.mean(axis=1)


def mask_stability(
    image: Any,
    boxes_xyxy: np.ndarray | torch.Tensor,
    masks: np.ndarray,
    segment: SegmentFn,
    fractions: Sequence[float] = DEFAULT_JITTER_FRACTIONS,
) -> np.ndarray:
    """Stability of each mask under box jitter (paper App. C), with full-resolution masks.

    For box ``i`` with mask ``masks[i]``: jitter the box with :func:`jitter_boxes` (kept inside the
    image), segment every jittered box, and average the IoU of ``masks[i]`` with each resulting mask
    (:func:`jitter_stability`). ``segment`` is called once with all ``N * K`` jittered boxes
    (box-major: rows ``i*K .. i*K+K-1`` belong to box ``i``); with ``N = 0`` it is not called.
    (The SAM segmenter computes the same inside its mask call, at its input resolution; this is the
    reference for any ``segment`` callable.)

    Args:
        image: passed unchanged to ``segment``.
        boxes_xyxy: ``(N, 4)`` prompt boxes that produced ``masks``.
        masks: ``(N, H, W)`` bool original masks.
        segment: ``segment(image, boxes (M, 4) float32) -> (M, H, W) bool``.
        fractions: shifts as fractions of each box's diagonal; ``K = 2 * len(fractions)``.

    Returns:
        ``(N,)`` float64 stability in ``[0, 1]``.
    """
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[0] != boxes.shape[0]:
        raise ValueError(f"need masks (N, H, W) for boxes (N, 4), got {masks.shape} and {boxes.shape}")
    if len(fractions) == 0:
        raise ValueError("mask_stability needs at least one jitter fraction")
    height, width = masks.shape[1:]
    return jittered_mask_stability(image, masks, jitter_boxes(boxes, fractions, width, height), segment)


def jittered_mask_stability(image: Any, masks: np.ndarray, jittered: np.ndarray, segment: SegmentFn) -> np.ndarray:
    """Stability of ``masks`` ``(N, H, W)`` under given jittered boxes ``(N, K, 4)``: one ``segment`` call
    with all ``N * K`` boxes (box-major), then :func:`jitter_stability`. Not called when ``N = 0``."""
    masks, jittered = np.asarray(masks), np.asarray(jittered, dtype=np.float32)
    n, height, width = masks.shape
    if jittered.ndim != 3 or jittered.shape[0] != n or jittered.shape[2] != 4:
        raise ValueError(f"need jittered boxes (N={n}, K, 4), got {jittered.shape}")
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    k = jittered.shape[1]
    jittered_masks = np.asarray(segment(image, jittered.reshape(-1, 4)))
    if jittered_masks.shape != (n * k, height, width):
        raise ValueError(f"segment returned {jittered_masks.shape}, expected {(n * k, height, width)}")
    return jitter_stability(masks, jittered_masks.reshape(n, k, height, width))


def stability_filter(stability: Sequence[float] | np.ndarray, threshold: float) -> np.ndarray:
    """Keep masks with ``stability >= threshold``: ``(N,)`` float in, ``(N,)`` bool out."""
    return np.asarray(stability, dtype=np.float64).reshape(-1) >= threshold
