"""Background ("stuff") masks (stage 6, paper §3): ``background(images) -> list[list[StuffSegment]]``.

A panoptic model segments the image; only segments of *stuff* classes (sky, grass, wall, ...) are kept,
each as a :class:`StuffSegment` with an ``(H, W)`` bool mask at the original image size. Segments of the
same stuff class are fused into one (``label_ids_to_fuse``), so each stuff label appears at most once.

Backends:

* ``mask2former`` (:class:`Mask2FormerBackground`): transformers ``Mask2FormerForUniversalSegmentation``.
  The HF config carries no thing/stuff flags, so the stuff classes are configured: ``stuff_classes``
  (names or ids) or, when absent, every id ``>= first_stuff_id``. The default 80 is the COCO-panoptic
  convention of the HF COCO checkpoints (ids 0-79 things, 80-132 stuff); ADE20K and other label spaces
  need an explicit ``stuff_classes``.
* ``maskdino`` (:class:`MaskDinoBackground`): the paper's Mask DINO through detectron2 + the ``maskdino``
  package (not on PyPI; ``docker/Dockerfile.cuda``). Its panoptic output flags ``isthing`` per segment.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from annotators._detectron2 import DETECTRON2_HINT, Detectron2Backend, detectron2_augment
from annotators._devices import existing_path, move_inputs, read_names
from annotators._hf import PretrainedVisionBackend, save_tiny
from annotators.base import AnnotatorError, StuffSegment, require

log = logging.getLogger(__name__)

MASKDINO_HINT = (
    "Mask DINO needs detectron2 and the maskdino package (IDEA-Research/MaskDINO, with its compiled "
    "MultiScaleDeformableAttention op), neither on PyPI; use the CUDA worker image built from docker/Dockerfile.cuda"
)


def segments_from_panoptic(
    segmentation: np.ndarray, segments_info: Sequence[Mapping[str, Any]], is_stuff: Any, label_of: Any
) -> list[StuffSegment]:
    """Stuff segments of one panoptic map.

    Args:
        segmentation: ``(H, W)`` int segment ids.
        segments_info: dicts with ``id``, ``label_id`` (or ``category_id``) and optionally ``score``/``isthing``;
            fused segments may be listed once per query: one segment per ``id``, the highest score kept.
        is_stuff: ``info -> bool``.
        label_of: ``class id -> name``.

    Returns:
        One :class:`StuffSegment` per stuff segment id with a non-empty mask, in first-seen order.
    """
    by_id: dict[int, tuple[int, float]] = {}
    for info in segments_info:
        if not is_stuff(info):
            continue
        segment_id = int(info["id"])
        label_id = int(info.get("label_id", info.get("category_id")))
        score = float(info.get("score", 1.0))
        if segment_id not in by_id or score > by_id[segment_id][1]:
            by_id[segment_id] = (label_id, score)
    segments = []
    for segment_id, (label_id, score) in by_id.items():
        mask = segmentation == segment_id
        if mask.any():
            segments.append(StuffSegment(label=label_of(label_id), mask=mask, score=score))
    return segments


class Mask2FormerBackground(PretrainedVisionBackend):
    """Mask2Former panoptic segmentation, stuff segments only.

    Args:
        model: local model folder or hub id (e.g. ``facebook/mask2former-swin-large-coco-panoptic``).
        stuff_classes: stuff class names or ids; default: ids ``>= first_stuff_id``.
        first_stuff_id: used when ``stuff_classes`` is absent (COCO panoptic: 80).
        score_threshold: query class-probability threshold (detectron2 Mask2Former panoptic default 0.8).
        mask_threshold: mask probability threshold (0.5).
        overlap_threshold: keep a query's segment only when this fraction of its mask survives the overlap
            resolution (detectron2 default 0.8).
        device, dtype, batch_size: as the other backends.
    """

    kind: ClassVar[str] = "background"
    name: ClassVar[str] = "mask2former"
    model_label: ClassVar[str] = "background model"

    def __init__(
        self,
        *,
        model: str,
        stuff_classes: Sequence[str | int] | str | None = None,
        first_stuff_id: int = 80,
        score_threshold: float = 0.8,
        mask_threshold: float = 0.5,
        overlap_threshold: float = 0.8,
        device: str = "auto",
        dtype: str = "float32",
        batch_size: int = 4,
    ) -> None:
        super().__init__(model=model, device=device, dtype=dtype, batch_size=batch_size)
        self.stuff_classes_source, self.first_stuff_id = stuff_classes, int(first_stuff_id)
        self.score_threshold, self.mask_threshold = float(score_threshold), float(mask_threshold)
        self.overlap_threshold = float(overlap_threshold)
        self.stuff_ids: set[int] = set()

    def load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        self._resolve_device()
        self._processor, model = self._from_pretrained(
            AutoImageProcessor, Mask2FormerForUniversalSegmentation, folder="Mask2Former model directory",
            label=f"Mask2Former {self.model_id!r}",
        )
        self.stuff_ids = self._resolve_stuff_ids(model.config.id2label)
        self._model = model.to(self._device).eval()
        log.info("loaded Mask2Former %s on %s, %d stuff classes", self.version, self._device, len(self.stuff_ids))

    def _resolve_stuff_ids(self, id2label: Mapping[int, str]) -> set[int]:
        id2label = {int(i): str(name) for i, name in id2label.items()}
        if self.stuff_classes_source is None:
            return {i for i in id2label if i >= self.first_stuff_id}
        source = self.stuff_classes_source
        entries = read_names(source, "stuff_classes") if isinstance(source, (str, Path)) else list(source)
        name2id = {name: i for i, name in id2label.items()}
        unknown = [e for e in entries if (e not in id2label if isinstance(e, int) else e not in name2id)]
        if unknown:
            raise AnnotatorError(f"stuff_classes not in the model's id2label: {unknown}")
        return {e if isinstance(e, int) else name2id[e] for e in entries}

    def __call__(self, images: Sequence[Image.Image]) -> list[list[StuffSegment]]:
        """Stuff segments per image; every mask is ``(H_i, W_i)`` bool at image ``i``'s size."""
        return self._in_chunks(images, self._segment_batch)

    def _segment_batch(self, images: list[Image.Image]) -> list[list[StuffSegment]]:
        inputs = move_inputs(self._processor(images=images, return_tensors="pt"), self._device, self._dtype)
        with torch.inference_mode():
            outputs = self._model(pixel_values=inputs["pixel_values"], pixel_mask=inputs.get("pixel_mask"))
        class_logits = outputs.class_queries_logits.float()  # (B, Q, num_labels + 1)
        mask_logits = outputs.masks_queries_logits.float()  # (B, Q, h, w) at 1/4 of the padded input
        label_of = self._model.config.id2label
        results = []
        for i, image in enumerate(images):
            valid = self._crop_padding(mask_logits[i], inputs.get("pixel_mask"), i)
            single = type(outputs)(class_queries_logits=class_logits[i : i + 1], masks_queries_logits=valid[None])
            panoptic = self._processor.post_process_panoptic_segmentation(
                single, threshold=self.score_threshold, mask_threshold=self.mask_threshold,
                overlap_mask_area_threshold=self.overlap_threshold, label_ids_to_fuse=self.stuff_ids,
                target_sizes=[(image.height, image.width)],
            )[0]
            segmentation = panoptic["segmentation"].cpu().numpy().astype(np.int32)
            results.append(segments_from_panoptic(
                segmentation, panoptic["segments_info"], lambda info: int(info["label_id"]) in self.stuff_ids,
                lambda label_id: str(label_of.get(label_id, label_id)),
            ))
        return results

    @staticmethod
    def _crop_padding(mask_logits: torch.Tensor, pixel_mask: torch.Tensor | None, index: int) -> torch.Tensor:
        """``(Q, h, w)`` logits without the batch padding (the processor pads bottom/right to the batch max).

        HF's post-processing resizes the whole padded map to the target size, which shifts and stretches
        masks of every image smaller than the batch max; detectron2 crops first (``sem_seg_postprocess``).
        """
        if pixel_mask is None:
            return mask_logits
        valid = pixel_mask[index].bool()
        padded_h, padded_w = valid.shape
        valid_h, valid_w = int(valid.any(dim=1).sum()), int(valid.any(dim=0).sum())
        h, w = mask_logits.shape[-2:]
        return mask_logits[:, : math.ceil(valid_h * h / padded_h), : math.ceil(valid_w * w / padded_w)]

    @classmethod
    def create_tiny(cls, out_dir: str | Path) -> dict[str, Any]:
        """Tiny random Mask2Former (Swin backbone, 8 queries, 6 classes; ids 3-5 stuff) saved to ``out_dir``.

        A random model's class probabilities are about 1 / 7 and its masks overlap everywhere; HF's panoptic
        post-processing compares score-weighted mask probabilities with ``mask_threshold``, so the returned
        config sets the score, mask and overlap thresholds to 0 to let segments through (tests and the smoke
        run exercise the whole path).
        """
        from transformers import (
            Mask2FormerConfig,
            Mask2FormerForUniversalSegmentation,
            Mask2FormerImageProcessor,
            SwinConfig,
        )

        out_dir = Path(out_dir)
        backbone = SwinConfig(
            image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
            out_features=["stage1", "stage2", "stage3", "stage4"],
        )
        labels = {i: name for i, name in enumerate(["person", "car", "dog", "sky", "grass", "wall"])}
        config = Mask2FormerConfig(
            backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,  # GroupNorm(32, .)
            encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
            dim_feedforward=32, num_queries=8, id2label=labels, label2id={v: k for k, v in labels.items()},
        )
        processor = Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
        save_tiny(Mask2FormerForUniversalSegmentation, config, processor, out_dir)
        return {"backend": cls.name, "model": str(out_dir), "device": "cpu", "first_stuff_id": 3,
                "score_threshold": 0.0, "mask_threshold": 0.0, "overlap_threshold": 0.0}


class MaskDinoBackground(Detectron2Backend):
    """Mask DINO panoptic (detectron2 yacs config + ``maskdino``), stuff segments only.

    Args:
        config_file: Mask DINO yaml (e.g. ``configs/coco/panoptic-segmentation/swin/...yaml``).
        checkpoint: weights for ``DetectionCheckpointer``.
        class_names: contiguous class names (list or file); default: ``stuff_classes`` of the metadata of
            ``cfg.DATASETS.TRAIN[0]`` (Mask DINO's panoptic datasets list all classes there).
        overrides: ``["KEY", "VALUE", ...]`` for ``cfg.merge_from_list``.
        dtype: float16/bfloat16 run under ``torch.autocast`` (weights stay float32).

    Mask DINO's panoptic output has no per-segment score: every segment gets ``score = 1.0``.
    """

    kind: ClassVar[str] = "background"
    name: ClassVar[str] = "maskdino"
    model_label: ClassVar[str] = "background model"

    def __init__(
        self,
        *,
        config_file: str,
        checkpoint: str,
        class_names: Sequence[str] | str | None = None,
        overrides: Sequence[str] = (),
        device: str = "auto",
        dtype: str = "float32",
        batch_size: int = 2,
    ) -> None:
        super().__init__(
            config_file=config_file, checkpoint=checkpoint, class_names=class_names, overrides=overrides,
            device=device, dtype=dtype, batch_size=batch_size,
        )

    def load(self) -> None:
        if self._model is not None:
            return
        require("detectron2", DETECTRON2_HINT)
        require("maskdino", MASKDINO_HINT)
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.config import get_cfg
        from detectron2.data import MetadataCatalog
        from detectron2.data import transforms as T
        from detectron2.modeling import build_model
        from detectron2.projects.deeplab import add_deeplab_config
        from maskdino import add_maskdino_config

        self._resolve_device()
        cfg = get_cfg()
        add_deeplab_config(cfg)
        add_maskdino_config(cfg)
        cfg.merge_from_file(str(existing_path(self.config_file, "Mask DINO config file")))
        cfg.merge_from_list(self.overrides + ["MODEL.DEVICE", str(self._device)])
        # Only the panoptic head's output is used: semantic and instance inference would run for nothing.
        cfg.MODEL.MaskDINO.TEST.PANOPTIC_ON = True
        cfg.MODEL.MaskDINO.TEST.SEMANTIC_ON = False
        cfg.MODEL.MaskDINO.TEST.INSTANCE_ON = False
        cfg.freeze()
        model = build_model(cfg).eval()
        DetectionCheckpointer(model).load(str(existing_path(self.checkpoint, "Mask DINO checkpoint")))
        self._augment = detectron2_augment(
            [T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)]
        )
        self._input_format = cfg.INPUT.FORMAT
        if self.class_names_source is not None:
            self.class_names = read_names(self.class_names_source, "Mask DINO class_names")
        else:
            self.class_names = list(MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("stuff_classes", []))
        if not self.class_names:
            raise AnnotatorError(f"Mask DINO {self.config_file}: no stuff_classes metadata; set class_names")
        self._model = model
        log.info("loaded Mask DINO %s on %s", self.version, self._device)

    def __call__(self, images: Sequence[Image.Image]) -> list[list[StuffSegment]]:
        return self._in_chunks(images, self._segment_batch)

    def _segment_batch(self, images: list[Image.Image]) -> list[list[StuffSegment]]:
        results = []
        for prediction in self._predict(images):
            panoptic, segments_info = prediction["panoptic_seg"]
            results.append(segments_from_panoptic(
                panoptic.cpu().numpy().astype(np.int32), segments_info, lambda info: not info["isthing"],
                lambda label_id: self.class_names[label_id],
            ))
        return results

    @classmethod
    def create_tiny(cls, out_dir: str | Path) -> dict[str, Any]:
        """Not offered: a tiny Mask DINO needs detectron2 + maskdino (docker image); use ``mask2former``."""
        raise AnnotatorError(f"background/maskdino has no tiny model here ({MASKDINO_HINT}); use 'mask2former'")
