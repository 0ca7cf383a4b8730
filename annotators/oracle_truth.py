"""Ground truth and noise models of the ``oracle`` backends (annotators/oracle.py) — a test instrument.

``load_truth`` reads COCO-style annotations (an instances JSON, optionally a captions JSON, the image folder) and
indexes every image by the hash of its decoded RGB pixels, so a backend that only receives PIL images finds the
image's ground truth whatever source delivered it (``lookup``). Optional per-image / per-annotation extras in
a ``umg`` object (what ``umg sample`` writes): ``images[].umg.tags`` / ``umg.captions`` and
``annotations[].umg.captions`` / ``umg.tags``; without them image tags are the category names present, image
captions come from the captions JSON, and a region's caption is its category name.

The noise helpers are pure functions of an explicit ``numpy.random.Generator``; ``keyed_rng`` derives that
generator from the oracle's seed and a content key (image id, region index, ...), so an output depends only on
the seed and the input, never on batching or on which other boxes were in the call.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou

from annotators.base import AnnotatorError


@dataclass(frozen=True)
class TruthRegion:
    """One annotated object: ``box`` xyxy pixels, category ``label``, ``captions`` and ``tags`` (non-empty)."""

    box: tuple[float, float, float, float]
    label: str
    captions: tuple[str, ...]
    tags: tuple[str, ...]
    segmentation: object = field(default=None, compare=False, repr=False)  # COCO polygon / RLE, decoded on use


@dataclass(frozen=True)
class TruthImage:
    id: int
    file_name: str
    width: int
    height: int
    tags: tuple[str, ...]
    captions: tuple[str, ...]
    regions: tuple[TruthRegion, ...]

    def boxes(self) -> np.ndarray:
        """``(R, 4)`` float32 xyxy ground-truth boxes."""
        return np.array([r.box for r in self.regions], np.float32).reshape(-1, 4)


@dataclass
class GroundTruth:
    """Every annotated image by pixel hash, plus the pools noise draws from (categories, captions)."""

    images: dict[bytes, TruthImage]
    categories: list[str]
    _masks: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        ordered = sorted(self.images.values(), key=lambda im: im.id)
        self.caption_pool = [(im.id, c) for im in ordered for c in im.captions]
        self.region_pool = [(im.id, i, r) for im in ordered for i, r in enumerate(im.regions)]

    def lookup(self, image: Image.Image) -> TruthImage:
        """The ground truth of ``image``; ``ValueError`` when no annotated image has these pixels."""
        found = self.images.get(pixel_key(image))
        if found is None:
            raise ValueError(f"image {image.size[0]}x{image.size[1]} is not in the oracle's annotations "
                             "(no annotated image has these decoded pixels)")
        return found

    def mask(self, image: TruthImage, index: int) -> np.ndarray:
        """``(H, W)`` bool mask of region ``index`` (the filled box when the annotation has no segmentation)."""
        key = (image.id, index)
        if key not in self._masks:
            self._masks[key] = decode_segmentation(image.regions[index], image.height, image.width)
        return self._masks[key]


def pixel_key(image: Image.Image) -> bytes:
    """Content key of an image: the hash of its size and RGB pixels (what ``decode_image`` yields for a file)."""
    pixels = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    return hashlib.blake2b(repr(pixels.shape).encode() + pixels.tobytes(), digest_size=16).digest()


def keyed_rng(seed: int, *key: object) -> np.random.Generator:
    """A generator determined by ``seed`` and ``key`` only (no global state, no call order)."""
    digest = hashlib.blake2b(repr((int(seed), *key)).encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


@functools.lru_cache(maxsize=4)
def load_truth(instances: str, captions: str | None, image_dir: str) -> GroundTruth:
    """Read and index the annotations (cached per process: the five oracle backends share one copy).

    Raises:
        AnnotatorError: a file is missing or not COCO-shaped, or an annotated image cannot be read.
    """
    data = _read_json(instances)
    try:
        categories = {c["id"]: c["name"] for c in data["categories"]}
        per_image: dict[int, list[TruthRegion]] = {im["id"]: [] for im in data["images"]}
        for ann in sorted(data["annotations"], key=lambda a: a["id"]):
            x, y, w, h = (float(v) for v in ann["bbox"])
            extra = ann.get("umg") or {}
            label = categories[ann["category_id"]]
            per_image[ann["image_id"]].append(TruthRegion(
                box=(x, y, x + w, y + h), label=label, captions=tuple(extra.get("captions") or [label]),
                tags=tuple(extra.get("tags") or [label]), segmentation=ann.get("segmentation")))
        texts: dict[int, list[str]] = {}
        if captions:
            for ann in sorted(_read_json(captions)["annotations"], key=lambda a: a["id"]):
                texts.setdefault(ann["image_id"], []).append(ann["caption"])
        images = {}
        for im in data["images"]:
            extra, regions = im.get("umg") or {}, per_image[im["id"]]
            tags = [t["name"] if isinstance(t, dict) else t for t in extra.get("tags") or []]
            truth = TruthImage(
                id=im["id"], file_name=im["file_name"], width=im["width"], height=im["height"],
                tags=tuple(tags or dict.fromkeys(r.label for r in regions)),
                captions=tuple(texts.get(im["id"]) or extra.get("captions") or []), regions=tuple(regions))
            images[_file_key(Path(image_dir) / im["file_name"])] = truth
    except (KeyError, TypeError, ValueError) as exc:
        raise AnnotatorError(f"oracle annotations {instances}: not COCO-shaped ({type(exc).__name__}: {exc})") from exc
    return GroundTruth(images=images, categories=[categories[k] for k in sorted(categories)])


def _read_json(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AnnotatorError(f"oracle annotations {path}: cannot read: {exc}") from exc


def _file_key(path: Path) -> bytes:
    try:
        with Image.open(path) as im:
            return pixel_key(im)
    except OSError as exc:
        raise AnnotatorError(f"oracle image {path}: cannot read: {exc}") from exc


def decode_segmentation(region: TruthRegion, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, RLE or uncompressed RLE) as ``(H, W)`` bool; the filled box if absent."""
    from pycocotools import mask as mask_utils

    seg = region.segmentation
    if not seg:
        out = np.zeros((height, width), bool)
        x1, y1, x2, y2 = np.round(region.box).astype(int)
        out[y1:y2, x1:x2] = True
        return out
    if isinstance(seg, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = {"size": seg["size"], "counts": seg["counts"].encode("ascii")}
    return mask_utils.decode(rle).astype(bool)


# ---- noise models (pure) -------------------------------------------------------------------------------------

def shift_boxes(boxes: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Translate each box by ``(u·w, v·h)`` with ``u, v ~ U(-fraction, fraction)``: ``(N, 4)`` -> ``(N, 4)``."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    sizes = boxes[:, 2:] - boxes[:, :2]
    offset = rng.uniform(-fraction, fraction, size=sizes.shape) * sizes
    return np.concatenate([boxes[:, :2] + offset, boxes[:, 2:] + offset], axis=1)


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """``(N, 4)`` boxes clipped to the image."""
    out = np.asarray(boxes, np.float64).copy()
    out[:, 0::2] = out[:, 0::2].clip(0, width)
    out[:, 1::2] = out[:, 1::2].clip(0, height)
    return out


def other_label(label: str, categories: Sequence[str], rng: np.random.Generator) -> str:
    """A category other than ``label`` drawn uniformly (``label`` itself when there is no other)."""
    others = [c for c in categories if c != label]
    return others[rng.integers(len(others))] if others else label


def random_box(width: int, height: int, side: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """A box of sides ``side`` fractions of the image's short side, placed uniformly inside the image: ``(4,)``."""
    short = min(width, height)
    w, h = (rng.uniform(*side, size=2) * short).clip(2, None)
    x1, y1 = rng.uniform(0, max(width - w, 0)), rng.uniform(0, max(height - h, 0))
    return np.array([x1, y1, x1 + w, y1 + h])


def quality_score(quality: np.ndarray, clean: Sequence[float], corrupted: Sequence[float],
                  rng: np.random.Generator) -> np.ndarray:
    """Detector confidence from a quality in ``[0, 1]`` (IoU with the truth, 0 for a wrong label or no object).

    ``score ~ N(mean, std)`` clipped to ``[0.01, 1]`` with ``(mean, std)`` interpolated linearly between
    ``corrupted`` (quality 0) and ``clean`` (quality 1): worse outputs score lower on average, and the two
    distributions overlap as a real detector's do. ``(N,)`` -> ``(N,)`` float32.
    """
    q = np.asarray(quality, np.float64).reshape(-1)
    mean = corrupted[0] + (clean[0] - corrupted[0]) * q
    std = corrupted[1] + (clean[1] - corrupted[1]) * q
    return rng.normal(mean, std).clip(0.01, 1.0).astype(np.float32)


def box_ious(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(N, 4)`` x ``(M, 4)`` -> ``(N, M)`` IoU (torchvision)."""
    a, b = np.asarray(a, np.float32).reshape(-1, 4), np.asarray(b, np.float32).reshape(-1, 4)
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)), np.float32)
    return box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()


def box_blob(box: Sequence[float], height: int, width: int) -> np.ndarray:
    """The ellipse inscribed in ``box``: what a segmenter returns on a box with nothing in it. ``(H, W)`` bool."""
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, max((x2 - x1) / 2, 0.5), max((y2 - y1) / 2, 0.5)
    ys, xs = np.ogrid[:height, :width]
    return ((xs + 0.5 - cx) / rx) ** 2 + ((ys + 0.5 - cy) / ry) ** 2 <= 1.0


def morph_mask(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Dilate (``pixels > 0``) or erode (``< 0``) a ``(H, W)`` bool mask with a square of side ``2|pixels|+1``."""
    if pixels == 0:
        return mask.copy()
    k = 2 * abs(pixels) + 1
    x = torch.from_numpy(mask if pixels > 0 else ~mask).float()[None, None]
    grown = torch.nn.functional.max_pool2d(x, k, stride=1, padding=abs(pixels))[0, 0].numpy() > 0
    return grown if pixels > 0 else ~grown


def offset_mask(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """``mask`` moved by ``(dx, dy)`` pixels; what moves out of the image is lost."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    src = mask[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    out[max(dy, 0):max(dy, 0) + src.shape[0], max(dx, 0):max(dx, 0) + src.shape[1]] = src
    return out


def mask_ious(mask: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one ``(H, W)`` mask with each of ``(K, H, W)`` masks: ``(K,)`` float64 (1 when both are empty)."""
    inter = (others & mask).sum(axis=(1, 2))
    union = (others | mask).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)
