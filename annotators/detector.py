"""Box detectors (stage 3, paper §3): ``detector(images) -> list[DetectorOutput]``, one per image.

Backends:

* ``hf`` (:class:`HfDetector`): any transformers object detector. Closed vocabulary (DETR family,
  RT-DETR, ...) through ``AutoModelForObjectDetection`` + ``AutoImageProcessor``; open vocabulary
  (OWLv2, OWL-ViT, Grounding DINO) when a ``vocabulary`` is configured, through
  ``AutoModelForZeroShotObjectDetection`` + ``AutoProcessor``.
* ``vitdet`` (:class:`ViTDetDetector`): the paper's ViTDet (trained on BigDetection / V3Det) through
  detectron2's LazyConfig; detectron2 is not on PyPI and ships in ``docker/Dockerfile.cuda`` (the detectron2
  plumbing it shares with the ``maskdino`` background is in ``annotators._detectron2``).

``threshold`` is only a model-side pre-filter (default 0.05); the paper's 0.3 cut and the NMS merge of the
two detectors happen later in ``pipeline.filters.threshold_and_merge``. Boxes are clipped to the image.
Config ``name`` names the instance (e.g. ``"bigdet"``, ``"v3det"``) and is exposed as ``instance_name``;
the class attribute ``name`` stays the registry backend name.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from annotators._detectron2 import (  # noqa: F401 - detectron2_inputs re-exported
    DETECTRON2_HINT,
    Detectron2Backend,
    detectron2_augment,
    detectron2_inputs,
)
from annotators._devices import existing_path, move_inputs, read_names
from annotators._hf import PretrainedVisionBackend, save_tiny
from annotators.base import AnnotatorError, DetectorOutput, require

log = logging.getLogger(__name__)


def clip_to_image(boxes_xyxy: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(N, 4)`` boxes clipped to ``[0, width] x [0, height]`` (float32)."""
    boxes = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4).copy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    return boxes


class HfDetector(PretrainedVisionBackend):
    """transformers object detector, closed- or open-vocabulary, batched.

    Args:
        model: local model folder (``save_pretrained`` layout) or hub id.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:<k>"``.
        dtype: ``"float32"``, ``"float16"`` (CUDA only), ``"bfloat16"``.
        batch_size: images per forward pass.
        threshold: score pre-filter passed to the processor's post-processing.
        vocabulary: class prompts (list, or path to a ``.json`` list / text file with one per line); switches to
            the zero-shot model classes. Every image is prompted with the full vocabulary.
        text_threshold: token threshold of Grounding-DINO-style post-processing (ignored by OWL models).
        name: instance name, e.g. ``"bigdet"``; defaults to the backend name.
    """

    kind: ClassVar[str] = "detector"
    name: ClassVar[str] = "hf"
    model_label: ClassVar[str] = "detector"

    def __init__(
        self,
        *,
        model: str,
        device: str = "auto",
        dtype: str = "float32",
        batch_size: int = 8,
        threshold: float = 0.05,
        vocabulary: Sequence[str] | str | None = None,
        text_threshold: float = 0.25,
        name: str | None = None,
    ) -> None:
        super().__init__(model=model, device=device, dtype=dtype, batch_size=batch_size)
        self.threshold = float(threshold)
        self.vocabulary_source = vocabulary
        self.text_threshold = float(text_threshold)
        self.instance_name = name or self.name
        self.vocabulary: list[str] | None = None

    @property
    def open_vocabulary(self) -> bool:
        return self.vocabulary_source is not None

    def load(self) -> None:
        """Resolve device/dtype, read the vocabulary, load model + processor (once)."""
        if self._model is not None:
            return
        import transformers

        self._resolve_device()
        if self.open_vocabulary:
            self.vocabulary = read_names(self.vocabulary_source, "detector vocabulary")
            model_cls, processor_cls = transformers.AutoModelForZeroShotObjectDetection, transformers.AutoProcessor
        else:
            model_cls, processor_cls = transformers.AutoModelForObjectDetection, transformers.AutoImageProcessor
        self._processor, model = self._from_pretrained(
            processor_cls, model_cls, folder="detector model directory",
            label=f"detector {self.model_id!r} with {model_cls.__name__}",
        )
        self._model = model.to(self._device).eval()
        log.info("loaded detector %s (%s) on %s %s", self.instance_name, self.version, self._device, self._dtype)

    def __call__(self, images: Sequence[Image.Image]) -> list[DetectorOutput]:
        """Detect in ``images``; returns one :class:`DetectorOutput` per image, boxes in that image's pixels."""
        return self._in_chunks(images, self._detect_batch)

    def _detect_batch(self, images: list[Image.Image]) -> list[DetectorOutput]:
        sizes = [(image.height, image.width) for image in images]
        if self.vocabulary is not None:
            inputs = self._processor(images=images, text=[self.vocabulary] * len(images), return_tensors="pt")
        else:
            inputs = self._processor(images=images, return_tensors="pt")
        inputs = move_inputs(inputs, self._device, self._dtype)
        with torch.inference_mode():
            raw = self._model(**inputs)
        for key, value in raw.items():  # post-process in float32 whatever the model dtype
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                raw[key] = value.float()
        results = self._post_process(raw, inputs, sizes)
        return [self._to_output(result, height, width) for result, (height, width) in zip(results, sizes, strict=True)]

    def _post_process(self, raw: Any, inputs: Mapping[str, Any], sizes: list[tuple[int, int]]) -> list[dict]:
        if self.vocabulary is None:
            return self._processor.post_process_object_detection(raw, threshold=self.threshold, target_sizes=sizes)
        post = self._processor.post_process_grounded_object_detection
        accepted = inspect.signature(post).parameters
        kwargs: dict[str, Any] = {"threshold": self.threshold, "target_sizes": sizes}
        if "text_labels" in accepted:
            kwargs["text_labels"] = [self.vocabulary] * len(sizes)
        if "input_ids" in accepted and "input_ids" in inputs:
            kwargs["input_ids"] = inputs["input_ids"]
        if "text_threshold" in accepted:
            kwargs["text_threshold"] = self.text_threshold
        return post(raw, **kwargs)

    def _to_output(self, result: Mapping[str, Any], height: int, width: int) -> DetectorOutput:
        boxes = result["boxes"].detach().float().cpu().numpy()
        scores = result["scores"].detach().float().cpu().numpy()
        if self.vocabulary is not None and result.get("text_labels") is not None:
            labels = [str(label) for label in result["text_labels"]]
        elif self.vocabulary is not None:
            labels = [self.vocabulary[int(i)] for i in result["labels"]]
        else:
            id2label = self._model.config.id2label
            labels = [str(id2label.get(int(i), int(i))) for i in result["labels"]]
        return DetectorOutput(boxes_xyxy=clip_to_image(boxes, height, width), scores=scores, labels=labels)

    @classmethod
    def create_tiny(cls, out_dir: str | Path, *, open_vocabulary: bool = False) -> dict[str, Any]:
        """Write a tiny random detector to ``out_dir``; closed: DETR + ResNet, open: OWLv2 + a byte-level tokenizer."""
        out_dir = Path(out_dir)
        cfg = {"backend": cls.name, "model": str(out_dir), "device": "cpu", "threshold": 0.0}
        if open_vocabulary:
            _save_tiny_owlv2(out_dir)
            return cfg | {"vocabulary": list(TINY_VOCABULARY), "name": "tiny-owlv2"}
        _save_tiny_detr(out_dir)
        return cfg | {"name": "tiny-detr"}


TINY_VOCABULARY = ("cat", "dog", "traffic light")


def _save_tiny_detr(out_dir: Path) -> None:
    """DETR with a 4-stage basic ResNet (no timm, no download), 10 queries, 5 classes; shortest-edge 64 resize."""
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

    backbone = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], layer_type="basic", out_features=["stage4"]
    )
    config = DetrConfig(
        backbone_config=backbone, use_timm_backbone=False, num_queries=10, d_model=16,
        encoder_layers=1, decoder_layers=1, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, id2label={i: f"class{i}" for i in range(5)},
    )
    processor = DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    save_tiny(DetrForObjectDetection, config, processor, out_dir)


def _save_tiny_owlv2(out_dir: Path) -> None:
    """OWLv2 (32 px input, patch 8) with a CLIP tokenizer whose BPE vocabulary is the 256 byte symbols, no merges."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(symbols + [s + "</w>" for s in symbols])}
    bos, eos = len(vocab), len(vocab) + 1
    vocab |= {"<|startoftext|>": bos, "<|endoftext|>": eos}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    config = Owlv2Config(text_config=text, vision_config=vision, projection_dim=16)
    image_processor = Owlv2ImageProcessor(size={"height": 32, "width": 32})
    processor = Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer)
    save_tiny(Owlv2ForObjectDetection, config, processor, out_dir)


class ViTDetDetector(Detectron2Backend):
    """ViTDet via detectron2 LazyConfig + ``DetectionCheckpointer``; batched ``DefaultPredictor``-style inference.

    Args:
        config_file: LazyConfig python file (e.g. ``projects/ViTDet/configs/...``) defining ``model`` and,
            optionally, ``dataloader.test.mapper.augmentations`` (the test-time resize; ViTDet: 1024 square).
        checkpoint: weights file for ``DetectionCheckpointer``.
        class_names: names of the contiguous class ids (list, or a ``.json`` list / text file with one name per
            line, in class-id order); default: the metadata of the config's test dataset, when detectron2 knows it.
            BigDetection (600 classes) and V3Det (13,204) are not registered there: give their names file.
        overrides: LazyConfig overrides, ``["model.roi_heads.box_predictor.test_score_thresh=0.05", ...]``.
        test_size: shortest/longest edge when the config has no test augmentations (ViTDet uses 1024).
        dtype: float16/bfloat16 run under ``torch.autocast`` (weights stay float32).
    """

    kind: ClassVar[str] = "detector"
    name: ClassVar[str] = "vitdet"
    model_label: ClassVar[str] = "detector"

    def __init__(
        self,
        *,
        config_file: str,
        checkpoint: str,
        class_names: Sequence[str] | str | None = None,
        overrides: Sequence[str] = (),
        test_size: int = 1024,
        device: str = "auto",
        dtype: str = "float32",
        batch_size: int = 4,
        threshold: float = 0.05,
        name: str | None = None,
    ) -> None:
        super().__init__(
            config_file=config_file, checkpoint=checkpoint, class_names=class_names, overrides=overrides,
            device=device, dtype=dtype, batch_size=batch_size,
        )
        self.test_size, self.threshold = int(test_size), float(threshold)
        self.instance_name = name or self.name

    def load(self) -> None:
        if self._model is not None:
            return
        require("detectron2", DETECTRON2_HINT)
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.config import LazyConfig, instantiate
        from detectron2.data import transforms as T

        self._resolve_device()
        config_file = existing_path(self.config_file, "ViTDet config file")
        checkpoint = existing_path(self.checkpoint, "ViTDet checkpoint")
        cfg = LazyConfig.apply_overrides(LazyConfig.load(str(config_file)), self.overrides)
        model = instantiate(cfg.model).to(self._device).eval()
        DetectionCheckpointer(model).load(str(checkpoint))
        test_mapper = cfg.get("dataloader", {}).get("test", {}).get("mapper", {})  # L(DatasetMapper)(...)
        if "augmentations" in test_mapper:
            augmentations = instantiate(test_mapper.augmentations)
        else:
            augmentations = [T.ResizeShortestEdge(short_edge_length=self.test_size, max_size=self.test_size)]
        self._augment = detectron2_augment(augmentations)
        self._input_format = getattr(model, "input_format", "BGR")
        self.class_names = self._resolve_class_names(cfg)
        self._model = model
        log.info("loaded ViTDet %s (%s) on %s", self.instance_name, self.version, self._device)

    def _resolve_class_names(self, cfg: Any) -> list[str]:
        if self.class_names_source is not None:
            return read_names(self.class_names_source, "ViTDet class_names")
        from detectron2.data import MetadataCatalog

        dataset = cfg.get("dataloader", {}).get("test", {}).get("dataset", {}).get("names")
        names = MetadataCatalog.get(dataset).get("thing_classes") if isinstance(dataset, str) else None
        if not names:
            raise AnnotatorError(
                f"ViTDet {self.config_file}: detectron2 has no thing_classes for dataset {dataset!r} (BigDetection "
                "and V3Det are not registered); set class_names to a file with one class name per line"
            )
        return list(names)

    def __call__(self, images: Sequence[Image.Image]) -> list[DetectorOutput]:
        return self._in_chunks(images, self._detect_batch)

    def _detect_batch(self, images: list[Image.Image]) -> list[DetectorOutput]:
        predictions = self._predict(images)
        return [
            self._to_output(prediction["instances"].to("cpu"), image.height, image.width)
            for image, prediction in zip(images, predictions, strict=True)
        ]

    def _to_output(self, instances: Any, height: int, width: int) -> DetectorOutput:
        scores = instances.scores.float().numpy()
        keep = scores >= self.threshold
        boxes = instances.pred_boxes.tensor.float().numpy()[keep]
        labels = [self.class_names[int(i)] for i in instances.pred_classes.numpy()[keep]]
        return DetectorOutput(boxes_xyxy=clip_to_image(boxes, height, width), scores=scores[keep], labels=labels)

    @classmethod
    def create_tiny(cls, out_dir: str | Path) -> dict[str, Any]:
        """Not offered: a tiny ViTDet needs detectron2 (docker image); the ``hf`` backend has a tiny detector."""
        raise AnnotatorError(f"detector/vitdet has no tiny model here ({DETECTRON2_HINT}); use backend 'hf'")
