"""``oracle`` backends: ground truth with controlled noise — a test instrument, not a model.

Each kind the paper's chain needs (tagger, captioner, detector, region_captioner, segmenter) has an ``oracle``
backend that answers from COCO-style annotations (``instances``, optional ``captions``, ``image_dir``; matched to
the incoming image by its decoded pixels, ``annotators/oracle_truth.py``) and corrupts the answer with seeded,
configurable noise. Every knob at 0 reproduces the ground truth. The outputs go through the same stages and
filters as a real model's, so a build with the oracle measures what the filters remove and what that does to
training (experiments/annotation_noise.py, docs/annotators.md "The oracle backends").

Noise knobs (all rates are probabilities per item; 0 everywhere = ground truth):

- detector: ``box_shift`` (each box moved by up to this fraction of its width / height), ``label_flip_rate``
  (label -> another category), ``miss_rate`` (object not reported), ``spurious_per_image`` (mean number of
  boxes on random places, random labels), ``duplicate_rate`` (a second, shifted copy of a box,
  ``duplicate_shift``); confidence from ``quality_score``: ``score_clean`` / ``score_corrupted`` ``[mean, std]``
  at quality 1 / 0, quality = IoU with the true box, 0 for a wrong label or no object;
- captioner: ``wrong_caption_rate`` (a caption replaced by one of another image);
- region_captioner: ``wrong_caption_rate`` (a caption replaced by one of another region); a box matching no
  object (IoU < ``match_iou``) gets the captions of a random region of another image (a hallucination);
- segmenter: ``sloppy_mask_rate`` of the objects get a sloppy mask, ``sloppy_mask``: ``blob`` (the ellipse of
  the prompt box, as a segmenter that missed the object: moves with the box, so box jitter exposes it),
  ``dilate`` / ``erode`` / ``offset`` by ``sloppy_mask_pixels`` (stable under jitter: the stability filter
  cannot see these); a box on no object gets its box's ellipse;
- tagger: ``label_flip_rate`` (a category tag -> another category).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from annotators import oracle_truth as ot
from annotators.base import AnnotatorError, Backend, DetectorOutput, SegmentOutput, check_batch
from data_schemas import Caption, RegionCaption, Tag

SLOPPY_MODES = ("blob", "dilate", "erode", "offset")


def _rate(name: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise AnnotatorError(f"oracle: {name} must be in [0, 1], got {value}")
    return float(value)


class OracleBackend(Backend):
    """Shared part: the annotation files, the seed, ``load`` (index the truth) and ``version``."""

    name: ClassVar[str] = "oracle"

    def __init__(self, *, instances: str, image_dir: str, captions: str | None, seed: int, knobs: dict) -> None:
        self.instances, self.image_dir, self.captions, self.seed = instances, image_dir, captions, int(seed)
        self.knobs = knobs
        self.truth: ot.GroundTruth | None = None

    @property
    def version(self) -> str:
        noise = ",".join(f"{k}={v}" for k, v in sorted(self.knobs.items()))
        return f"oracle:{Path(self.instances).name}:seed{self.seed}:{noise}"

    def load(self) -> None:
        for path in (self.instances, self.captions, self.image_dir):
            if path is not None and not Path(path).exists():
                raise AnnotatorError(f"oracle {self.kind}: {path} does not exist")
        self.truth = ot.load_truth(str(self.instances), str(self.captions) if self.captions else None,
                                   str(self.image_dir))

    @classmethod
    def create_tiny(cls, out_dir: str | Path) -> dict[str, Any]:
        raise AnnotatorError("the oracle has no model to create: give it ground-truth annotations (instances, "
                             "image_dir) instead of tiny: true")

    def _lookup(self, image: Image.Image) -> ot.TruthImage:
        if self.truth is None:
            raise AnnotatorError("call load() before annotating")
        return self.truth.lookup(image)

    def _rng(self, *key: object) -> np.random.Generator:
        return ot.keyed_rng(self.seed, self.kind, *key)

    def _other(self, pool: list, image_id: int, rng: np.random.Generator):
        """A pool entry of another image than ``image_id`` (entries are tuples starting with the image id)."""
        for _ in range(100):
            entry = pool[rng.integers(len(pool))]
            if entry[0] != image_id:
                return entry
        raise ValueError("oracle: the annotations hold no other image to draw a wrong caption from")


class OracleTagger(OracleBackend):
    kind: ClassVar[str] = "tagger"

    def __init__(self, *, instances: str, image_dir: str, captions: str | None = None, seed: int = 0,
                 label_flip_rate: float = 0.0, batch_size: int = 32) -> None:
        super().__init__(instances=instances, image_dir=image_dir, captions=captions, seed=seed,
                         knobs={"label_flip_rate": _rate("label_flip_rate", label_flip_rate)})
        self.batch_size = batch_size

    def __call__(self, images: Sequence[Image.Image]) -> list[list[Tag]]:
        out = []
        for image in images:
            truth = self._lookup(image)
            rng, flip = self._rng(truth.id), self.knobs["label_flip_rate"]
            names = [ot.other_label(t, self.truth.categories, rng) if t in self.truth.categories
                     and rng.random() < flip else t for t in truth.tags]
            out.append([Tag(name=n, score=1.0, annotator=self.name) for n in dict.fromkeys(names)])
        return out


class OracleCaptioner(OracleBackend):
    kind: ClassVar[str] = "captioner"

    def __init__(self, *, instances: str, image_dir: str, captions: str | None = None, seed: int = 0,
                 wrong_caption_rate: float = 0.0, batch_size: int = 32) -> None:
        super().__init__(instances=instances, image_dir=image_dir, captions=captions, seed=seed,
                         knobs={"wrong_caption_rate": _rate("wrong_caption_rate", wrong_caption_rate)})
        self.batch_size = batch_size

    def __call__(self, images: Sequence[Image.Image]) -> list[list[Caption]]:
        out = []
        for image in images:
            truth = self._lookup(image)
            rng, texts = self._rng(truth.id), []
            for text in truth.captions:
                if rng.random() < self.knobs["wrong_caption_rate"]:
                    text = self._other(self.truth.caption_pool, truth.id, rng)[1]
                texts.append(text)
            out.append([Caption(text=t, annotator=self.name) for t in dict.fromkeys(texts)])
        return out


class OracleDetector(OracleBackend):
    kind: ClassVar[str] = "detector"

    def __init__(self, *, instances: str, image_dir: str, captions: str | None = None, seed: int = 0,
                 box_shift: float = 0.0, label_flip_rate: float = 0.0, miss_rate: float = 0.0,
                 spurious_per_image: float = 0.0, spurious_side: tuple[float, float] = (0.2, 0.6),
                 duplicate_rate: float = 0.0, duplicate_shift: float = 0.15,
                 score_clean: tuple[float, float] = (0.9, 0.05), score_corrupted: tuple[float, float] = (0.3, 0.15),
                 batch_size: int = 32) -> None:
        if box_shift < 0 or duplicate_shift < 0 or spurious_per_image < 0:
            raise AnnotatorError("oracle detector: box_shift, duplicate_shift and spurious_per_image must be >= 0")
        for name, pair in (("score_clean", score_clean), ("score_corrupted", score_corrupted),
                           ("spurious_side", spurious_side)):
            if len(pair) != 2 or min(pair) < 0:
                raise AnnotatorError(f"oracle detector: {name} must be two numbers >= 0, got {pair}")
        knobs = {"box_shift": box_shift, "label_flip_rate": _rate("label_flip_rate", label_flip_rate),
                 "miss_rate": _rate("miss_rate", miss_rate), "spurious_per_image": spurious_per_image,
                 "duplicate_rate": _rate("duplicate_rate", duplicate_rate), "duplicate_shift": duplicate_shift}
        super().__init__(instances=instances, image_dir=image_dir, captions=captions, seed=seed, knobs=knobs)
        self.spurious_side, self.score_clean, self.score_corrupted = spurious_side, score_clean, score_corrupted
        self.batch_size = batch_size

    def __call__(self, images: Sequence[Image.Image]) -> list[DetectorOutput]:
        return [self._detect(image) for image in images]

    def _detect(self, image: Image.Image) -> DetectorOutput:
        """Per true object: maybe missed, shifted, maybe relabelled, maybe duplicated; then spurious boxes."""
        truth, k = self._lookup(image), self.knobs
        rng, categories = self._rng(truth.id), self.truth.categories
        true_boxes = truth.boxes()
        kept = [i for i in range(len(true_boxes)) if rng.random() >= k["miss_rate"]]
        boxes = ot.shift_boxes(true_boxes[kept], k["box_shift"], rng)
        labels = [truth.regions[i].label for i in kept]
        right = np.ones(len(kept), bool)
        for j, label in enumerate(labels):
            if rng.random() < k["label_flip_rate"]:
                labels[j], right[j] = ot.other_label(label, categories, rng), False
        dup = np.array([rng.random() < k["duplicate_rate"] for _ in kept], bool)
        dup_boxes = ot.shift_boxes(true_boxes[kept][dup], k["duplicate_shift"], rng)
        n_spurious = rng.poisson(k["spurious_per_image"])
        spurious = np.array([ot.random_box(truth.width, truth.height, self.spurious_side, rng)
                             for _ in range(n_spurious)]).reshape(-1, 4)
        all_boxes = ot.clip_boxes(np.vstack([boxes, dup_boxes, spurious]), truth.width, truth.height)
        all_labels = labels + [l for l, d in zip(labels, dup) if d] + \
            [categories[rng.integers(len(categories))] for _ in range(n_spurious)]
        ious = ot.box_ious(all_boxes, true_boxes).max(axis=1) if len(true_boxes) else np.zeros(len(all_boxes))
        quality = ious * np.concatenate([right, right[dup], np.zeros(n_spurious, bool)])
        scores = ot.quality_score(quality, self.score_clean, self.score_corrupted, rng)
        valid = (all_boxes[:, 2] > all_boxes[:, 0]) & (all_boxes[:, 3] > all_boxes[:, 1])
        return DetectorOutput(all_boxes[valid], scores[valid], [l for l, v in zip(all_labels, valid) if v])


def _match(truth: ot.TruthImage, boxes: np.ndarray, match_iou: float) -> list[int | None]:
    """Index of the true region each box covers (highest IoU, >= ``match_iou``), None for a box on no object."""
    ious = ot.box_ious(boxes, truth.boxes())
    if not ious.size:
        return [None] * len(boxes)
    best = ious.argmax(axis=1)
    return [int(b) if ious[i, b] >= match_iou else None for i, b in enumerate(best)]


class OracleRegionCaptioner(OracleBackend):
    kind: ClassVar[str] = "region_captioner"

    def __init__(self, *, instances: str, image_dir: str, captions: str | None = None, seed: int = 0,
                 wrong_caption_rate: float = 0.0, match_iou: float = 0.5, batch_size: int = 32) -> None:
        super().__init__(instances=instances, image_dir=image_dir, captions=captions, seed=seed,
                         knobs={"wrong_caption_rate": _rate("wrong_caption_rate", wrong_caption_rate)})
        self.match_iou, self.batch_size = _rate("match_iou", match_iou), batch_size

    def __call__(self, images: Sequence[Image.Image], boxes: Sequence[np.ndarray]) -> list[list[list[RegionCaption]]]:
        check_batch(images, boxes)
        out = []
        for image, image_boxes in zip(images, boxes):
            truth = self._lookup(image)
            image_boxes = np.asarray(image_boxes, np.float32).reshape(-1, 4)
            out.append([self._captions(truth, box, index)
                        for box, index in zip(image_boxes, _match(truth, image_boxes, self.match_iou))])
        return out

    def _captions(self, truth: ot.TruthImage, box: np.ndarray, index: int | None) -> list[RegionCaption]:
        pool = self.truth.region_pool
        if index is None:  # nothing there: the captions of a random object elsewhere
            rng = self._rng(truth.id, "none", *np.round(box, 1).tolist())
            texts = list(self._other(pool, truth.id, rng)[2].captions)
        else:
            rng, texts = self._rng(truth.id, index), []
            for text in truth.regions[index].captions:
                if rng.random() < self.knobs["wrong_caption_rate"]:
                    text = self._other(pool, truth.id, rng)[2].captions[0]
                texts.append(text)
        return [RegionCaption(text=t, annotator=self.name) for t in dict.fromkeys(texts)]


class OracleSegmenter(OracleBackend):
    kind: ClassVar[str] = "segmenter"

    def __init__(self, *, instances: str, image_dir: str, captions: str | None = None, seed: int = 0,
                 sloppy_mask_rate: float = 0.0, sloppy_mask: str = "blob", sloppy_mask_pixels: int = 3,
                 match_iou: float = 0.5, batch_size: int = 32) -> None:
        if sloppy_mask not in SLOPPY_MODES:
            raise AnnotatorError(f"oracle segmenter: sloppy_mask must be one of {SLOPPY_MODES}, got {sloppy_mask!r}")
        knobs = {"sloppy_mask_rate": _rate("sloppy_mask_rate", sloppy_mask_rate), "sloppy_mask": sloppy_mask,
                 "sloppy_mask_pixels": int(sloppy_mask_pixels)}
        super().__init__(instances=instances, image_dir=image_dir, captions=captions, seed=seed, knobs=knobs)
        self.match_iou, self.batch_size = _rate("match_iou", match_iou), batch_size

    def __call__(self, images: Sequence[Image.Image], boxes: Sequence[np.ndarray],
                 jittered: Sequence[np.ndarray] | None = None) -> list[SegmentOutput]:
        """One mask per box; with ``jittered`` ``(N_i, K, 4)`` per image also each mask's mean IoU with the masks
        of its jittered boxes (the stability the ``stability`` stage filters on)."""
        check_batch(images, boxes, *([jittered] if jittered is not None else []))
        out = []
        for i, image in enumerate(images):
            truth = self._lookup(image)
            image_boxes = np.asarray(boxes[i], np.float32).reshape(-1, 4)
            masks = self._masks(truth, image_boxes)
            stability = None
            if jittered is not None:
                shifted = np.asarray(jittered[i], np.float32)
                stability = np.array([ot.mask_ious(mask, self._masks(truth, copies.reshape(-1, 4))).mean()
                                      for mask, copies in zip(masks, shifted)], np.float64).reshape(-1)
            out.append(SegmentOutput(masks, np.ones(len(image_boxes), np.float32), stability))
        return out

    def _masks(self, truth: ot.TruthImage, boxes: np.ndarray) -> np.ndarray:
        """``(N, H, W)`` bool: the object's mask for a box on an object (sloppy for some objects), else a blob."""
        masks = np.zeros((len(boxes), truth.height, truth.width), bool)
        for j, (box, index) in enumerate(zip(boxes, _match(truth, boxes, self.match_iou))):
            if index is None:
                masks[j] = ot.box_blob(box, truth.height, truth.width)
                continue
            rng = self._rng(truth.id, index)  # keyed by the object: a jittered box gets the same decision
            if rng.random() >= self.knobs["sloppy_mask_rate"]:
                masks[j] = self.truth.mask(truth, index)
            else:
                masks[j] = self._sloppy(self.truth.mask(truth, index), box, rng)
        return masks

    def _sloppy(self, mask: np.ndarray, box: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        mode, pixels = self.knobs["sloppy_mask"], self.knobs["sloppy_mask_pixels"]
        if mode == "blob":
            return ot.box_blob(box, *mask.shape)
        if mode == "offset":
            angle = rng.uniform(0, 2 * np.pi)
            return ot.offset_mask(mask, int(round(pixels * np.cos(angle))), int(round(pixels * np.sin(angle))))
        return ot.morph_mask(mask, pixels if mode == "dilate" else -pixels)


def fill_truth(annotate: dict, instances: str | Path, image_dir: str | Path, captions: str | Path | None = None) -> dict:
    """A copy of an ``annotate:`` config tree with ``instances`` / ``image_dir`` / ``captions`` set on every
    ``backend: oracle`` entry (so a config file can hold the noise and one call names the ground truth)."""
    truth = {"instances": str(instances), "image_dir": str(image_dir), "captions": str(captions) if captions else None}

    def fill(node: Any) -> Any:
        if isinstance(node, dict):
            node = {k: fill(v) for k, v in node.items()}
            return {**node, **truth} if node.get("backend") == "oracle" else node
        return node

    return fill(annotate)
