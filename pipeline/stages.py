"""The per-shard annotation chain: tag → caption → score → detect → merge → region caption →
segment → jitter stability → background (DESIGN.md "Annotation stages", paper §3 / App. C).

A ``Stage`` splits its work in two so orchestrators can move the model call elsewhere (a Ray actor):
``arguments(items)`` gathers the per-image inputs of one batched annotator call (plain, picklable
data), the annotator runs on them, and ``apply(item, output)`` writes the result into the record.
``run_stage`` calls the annotator on the whole batch; when it raises, the batch is split in halves
and retried down to single images, and an image that still fails gets ``item.error`` (an error row)
while the rest of the shard goes on; a call whose worker process dies is bisected the same way across
worker restarts (``pipeline.worker_deaths``). Stages are independent of Prefect and Ray.

Provenance keys: single-instance stages use their kind (``tagger``, ``scorer``, ``segmenter``,
``stability``, ``background``, ``merge``); named instances use ``<kind>_<name>`` (``captioner_blip2``,
``detector_bigdet``, ``region_captioner_vlm``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import annotators
from annotators.prompts import caption_key
from data_schemas import AnnotateConfig, BackgroundMask, Mask, MergeConfig, Region, StabilityConfig
from pipeline.filters import (
    Detections,
    apply_caption_scores,
    clip_boxes_to_image,
    jitter_boxes,
    stability_filter,
    threshold_and_merge,
)
from pipeline.ingest import IngestedItem
from pipeline.masks import encode_mask
from pipeline.worker_deaths import call_bisecting, poison_reason

log = logging.getLogger(__name__)


def backend_tag(annotator: Any) -> str:
    return f"{annotator.name}@{annotator.version}"


@dataclass
class Stage:
    """One step of the chain. ``annotator`` is None for pure stages (merge)."""

    name: str
    annotator: Any = None

    def arguments(self, items: Sequence[IngestedItem]) -> tuple[list, ...]:
        """Per-image argument lists of the batched annotator call (default: the images)."""
        return ([item.decoded.image for item in items],)

    def apply(self, item: IngestedItem, output: Any) -> None:
        raise NotImplementedError

    def record_provenance(self, item: IngestedItem) -> None:
        if self.annotator is not None:
            item.record.provenance[self.name] = backend_tag(self.annotator)


class TagStage(Stage):
    def apply(self, item, output):
        item.record.tags = [*item.record.tags, *output]


def new_captions(existing: Sequence[Any], found: Sequence[Any]) -> list[Any]:
    """``found`` captions whose text (``caption_key``: case, punctuation, spacing ignored) is not yet among
    ``existing`` or earlier in ``found``: captions are de-duplicated across captioners (paper App. D)."""
    seen = {caption_key(c.text) for c in existing}
    fresh = []
    for caption in found:
        key = caption_key(caption.text)
        if key not in seen:
            seen.add(key)
            fresh.append(caption)
    return fresh


class CaptionStage(Stage):
    def apply(self, item, output):
        item.record.captions = [*item.record.captions, *new_captions(item.record.captions, output)]


@dataclass
class ScoreStage(Stage):
    threshold: float = 0.2

    def arguments(self, items):
        return [item.decoded.image for item in items], [[c.text for c in item.record.captions] for item in items]

    def apply(self, item, output):
        item.record.captions = apply_caption_scores(item.record.captions, output, self.threshold)


@dataclass
class DetectStage(Stage):
    source: str = ""

    def apply(self, item, output):
        found = Detections.from_detector(output.boxes_xyxy, output.scores, output.labels, source=self.source)
        item.scratch.setdefault("detections", []).append(found)


def load_label_map(source: dict[str, str] | Path | None) -> dict[str, str] | None:
    """``merge.label_map``: a mapping as given, or read from a YAML / JSON file holding one (safe loader)."""
    if source is None or isinstance(source, dict):
        return source
    try:
        table = yaml.safe_load(Path(source).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"merge.label_map {source}: cannot read it: {exc}") from exc
    if not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in table.items()):
        raise ValueError(f"merge.label_map {source}: must hold a mapping of label -> shared label (strings)")
    return table


@dataclass
class MergeStage(Stage):
    """Threshold + NMS across detectors (class-agnostic, or class-aware in the ``label_map`` vocabulary),
    clip to the image, keep the top ``max_regions``."""

    config: MergeConfig = field(default_factory=MergeConfig)

    def __post_init__(self) -> None:
        self.label_map = load_label_map(self.config.label_map)

    def apply(self, item, output):
        parts = item.scratch.pop("detections", [])
        if not parts:
            return
        cfg = self.config
        merged = threshold_and_merge(parts, cfg.score_threshold, cfg.iou_threshold, cfg.class_aware, self.label_map)
        boxes, valid = clip_boxes_to_image(merged.boxes, item.record.width, item.record.height, cfg.min_box_side)
        next_id = max((r.id for r in item.record.regions), default=-1) + 1
        new_regions = []
        for box, score, label, source, ok in zip(boxes.tolist(), merged.scores.tolist(), merged.labels,
                                                 merged.sources, valid.tolist()):
            if not ok or len(new_regions) == cfg.max_regions:
                continue
            new_regions.append(Region(id=next_id + len(new_regions), box_xyxy=tuple(box), label=label,
                                      score=min(max(score, 0.0), 1.0), annotator=f"detector_{source}"))
        item.record.regions = [*item.record.regions, *new_regions]
        mode = ("aware" if cfg.class_aware else "agnostic") + ("_mapped" if self.label_map is not None else "")
        item.record.provenance[self.name] = f"nms@iou{cfg.iou_threshold}_score{cfg.score_threshold}_{mode}"


def _region_boxes(item: IngestedItem, regions: Sequence[Region]) -> np.ndarray:
    return np.array([r.box_xyxy for r in regions], dtype=np.float32).reshape(-1, 4)


class RegionCaptionStage(Stage):
    def arguments(self, items):
        return [it.decoded.image for it in items], [_region_boxes(it, it.record.regions) for it in items]

    def apply(self, item, output):
        if len(output) != len(item.record.regions):
            raise ValueError(f"{len(output)} caption lists for {len(item.record.regions)} regions")
        item.record.regions = [
            region.model_copy(update={"captions": [*region.captions, *new_captions(region.captions, captions)]})
            for region, captions in zip(item.record.regions, output)
        ]


@dataclass
class RegionCaptionCountStage(Stage):
    """Drop detected regions with fewer than ``min_captions`` distinct captions after all region captioners
    (paper App. D: every region keeps >= 4); regions that came with the input are kept. A pure stage."""

    min_captions: int = 0

    def apply(self, item, output):
        item.record.regions = [r for r in item.record.regions
                               if not r.annotator.startswith("detector_") or len(r.captions) >= self.min_captions]
        item.record.provenance[self.name] = f"min_captions@{self.min_captions}"


def _unmasked(item: IngestedItem) -> list[int]:
    return [i for i, region in enumerate(item.record.regions) if region.mask is None]


@dataclass
class SegmentStage(Stage):
    """SAM masks for every region without a mask.

    With ``stability`` set, each box's jittered copies (:func:`~pipeline.filters.jitter_boxes`, ``(N_i, K, 4)``
    per image) go into the same segmenter call, which returns each mask's stability: the image is encoded once
    for both, and no jitter mask leaves the segmenter. ``StabilityStage`` then applies the threshold.
    """

    stability: StabilityConfig | None = None

    def arguments(self, items):
        boxes = [_region_boxes(it, [it.record.regions[i] for i in _unmasked(it)]) for it in items]
        images = [it.decoded.image for it in items]
        if self.stability is None:
            return images, boxes
        fractions = self.stability.diagonal_fractions
        jittered = [jitter_boxes(b, fractions, it.record.width, it.record.height) for b, it in zip(boxes, items)]
        return images, boxes, jittered

    def apply(self, item, output):
        indices = _unmasked(item)
        if len(output.masks) != len(indices):
            raise ValueError(f"{len(output.masks)} masks for {len(indices)} boxes")
        stability = None
        if self.stability is not None:
            if output.stability is None or len(output.stability) != len(indices):
                raise ValueError(f"segmenter returned no stability per box for {len(indices)} jittered boxes")
            stability = np.asarray(output.stability, dtype=np.float64)
        regions = list(item.record.regions)
        for index, mask in zip(indices, output.masks):
            rle = encode_mask(np.asarray(mask, dtype=bool))
            regions[index] = regions[index].model_copy(
                update={"mask": Mask(rle=rle, annotator=f"segmenter_{self.annotator.name}")}
            )
        item.record.regions = regions
        item.scratch["segmented"] = (indices, stability)


@dataclass
class StabilityStage(Stage):
    """Keep masks whose jitter stability (computed by the segmenter call) is ``>= threshold``; a pure stage."""

    config: StabilityConfig = field(default_factory=StabilityConfig)

    def apply(self, item, output):
        indices, stability = item.scratch.pop("segmented", ([], None))
        cfg = self.config
        item.record.provenance[self.name] = f"jitter@diag{cfg.diagonal_fractions}_thr{cfg.threshold}"
        if not indices:
            return
        if stability is None:
            raise ValueError("the segmenter stage ran without stability config: no stability to filter on")
        keep = stability_filter(stability, cfg.threshold)
        regions = list(item.record.regions)
        for index, score, kept in zip(indices, stability.tolist(), keep.tolist()):
            mask = regions[index].mask.model_copy(update={"stability": round(score, 4)}) if kept else None
            regions[index] = regions[index].model_copy(update={"mask": mask})
        item.record.regions = regions


class BackgroundStage(Stage):
    def apply(self, item, output):
        found = [
            BackgroundMask(label=seg.label, rle=encode_mask(np.asarray(seg.mask, dtype=bool)),
                           score=min(max(float(seg.score), 0.0), 1.0), annotator=f"background_{self.annotator.name}")
            for seg in output
        ]
        item.record.background = [*item.record.background, *found]


def build_chain(cfg: AnnotateConfig) -> list[Stage]:
    """Stages in paper order; stages without a configured backend are left out."""
    build = annotators.build
    stages: list[Stage] = []
    if cfg.tagger:
        stages.append(TagStage("tagger", build("tagger", cfg.tagger)))
    stages += [CaptionStage(f"captioner_{n}", build("captioner", c)) for n, c in cfg.captioners.items()]
    if cfg.scorer:
        stages.append(ScoreStage("scorer", build("scorer", cfg.scorer), threshold=cfg.caption_filter.threshold))
    stages += [DetectStage(f"detector_{n}", build("detector", c), source=n) for n, c in cfg.detectors.items()]
    if cfg.detectors:
        stages.append(MergeStage("merge", config=cfg.merge))
    stages += [
        RegionCaptionStage(f"region_captioner_{n}", build("region_captioner", c))
        for n, c in cfg.region_captioners.items()
    ]
    if cfg.region_captioners and cfg.min_region_captions:
        stages.append(RegionCaptionCountStage("region_caption_count", min_captions=cfg.min_region_captions))
    if cfg.segmenter:
        stages.append(SegmentStage("segmenter", build("segmenter", cfg.segmenter), stability=cfg.stability))
        if cfg.stability is not None:
            stages.append(StabilityStage("stability", config=cfg.stability))
    if cfg.background:
        stages.append(BackgroundStage("background", build("background", cfg.background)))
    return stages


def call_annotator(stage: Stage, items: Sequence[IngestedItem]) -> list[Any]:
    """One batched call for ``items``; on failure split in halves down to single images.

    Returns one output per item (None for items that failed; their ``error`` is set). A worker that dies
    (``annotators.WorkerLost``) is bisected across restarts (``pipeline.worker_deaths``): an input that kills
    its worker twice alone is one ``worker_lost`` error row; more deaths than that re-raise ``WorkerLost``.
    """
    if stage.annotator is None:
        return [None] * len(items)

    def poisoned(item: IngestedItem, exc: BaseException) -> None:
        item.error = poison_reason(stage.name, exc)
        log.warning("%s: %s killed its worker twice: one error row", stage.name, item.record.key)

    return call_bisecting(items, lambda batch: _call_splitting(stage, batch), poisoned)


def _call_splitting(stage: Stage, items: Sequence[IngestedItem]) -> list[Any]:
    try:
        outputs = list(stage.annotator(*stage.arguments(items)))
        if len(outputs) != len(items):
            raise ValueError(f"{stage.name} returned {len(outputs)} outputs for {len(items)} images")
        return outputs
    except annotators.WorkerLost:
        raise  # the worker died: ``call_bisecting`` retries on a replacement
    except Exception as exc:  # noqa: BLE001 - an annotator failure must not stop the shard
        if len(items) == 1:
            items[0].error = f"annotator_failed: {stage.name}: {type(exc).__name__}: {exc}"
            log.warning("%s failed on %s: %s", stage.name, items[0].record.key, exc)
            return [None]
        half = len(items) // 2
        log.info("%s failed on a batch of %d (%s); retrying in halves", stage.name, len(items), exc)
        return _call_splitting(stage, items[:half]) + _call_splitting(stage, items[half:])


def run_stage(stage: Stage, items: Sequence[IngestedItem]) -> None:
    """Run one stage over the items that have not failed yet (a model stage: only those it can take,
    ``IngestedItem.skip_models``)."""
    live = [item for item in items if item.error is None and (stage.annotator is None or item.skip_models is None)]
    if not live:
        return
    for item, output in zip(live, call_annotator(stage, live)):
        if item.error is not None:
            continue
        try:
            stage.apply(item, output)
            stage.record_provenance(item)
        except Exception as exc:  # noqa: BLE001 - a malformed output fails this image only
            item.error = f"annotator_output: {stage.name}: {type(exc).__name__}: {exc}"


@dataclass
class Chain:
    """The configured stages; ``load()`` once per worker, then call on each shard's items."""

    stages: list[Stage]
    keep_known: bool = True

    @classmethod
    def from_config(cls, cfg: AnnotateConfig) -> Chain:
        return cls(build_chain(cfg), keep_known=cfg.keep_known)

    def load(self) -> None:
        loaded: set[int] = set()
        for stage in self.stages:
            if stage.annotator is not None and id(stage.annotator) not in loaded:
                stage.annotator.load()
                loaded.add(id(stage.annotator))

    def __call__(self, items: list[IngestedItem]) -> list[IngestedItem]:
        if not self.keep_known:
            for item in items:
                record = item.record
                record.tags, record.captions, record.regions, record.background = [], [], [], []
                record.provenance = {}
        for stage in self.stages:
            run_stage(stage, items)
        return items
