"""Region captioners (DESIGN.md "Annotation stages" 4): ``(images, boxes_per_image) -> [image][box][RegionCaption]``.

Boxes are float arrays (N_i, 4) xyxy in pixels of their image; N_i may be 0. Captions per box are stripped,
deduplicated and non-empty (a box may get an empty list when the model produced only whitespace).

- ``VlmBoxCaptioner`` (``vlm-box``): Shikra-style box-in-prompt. The box is written into the prompt in the frame of
  the pixels the model receives (``annotators/box_prompt.py``: pad to square for Shikra / LLaVA-1.5, then the
  processor's resize and centre crop), normalised ``[x1,y1,x2,y2]`` in the family's format (Shikra:
  ``[0.102,0.250,0.480,0.911]``); prompts fixed or sampled per box from a set (built-in ``region``); all (box, prompt)
  jobs of the batch are generated ``batch_size`` per ``generate``, each image encoded once and its prompt prefix
  computed once (``shared_prefix``, ``annotators/shared_prefix.py``; ``false``: each job with its full image).
  ``engine: vllm`` runs the same prompts through vLLM, all jobs of a call in one request list, its automatic
  prefix caching sharing each image's prefix (``annotators/vllm_engine.py``; its own stage environment).
- ``CropCaptioner`` (``crop``): the portable backend; crops each box (padded by ``pad`` x box size per side, grown
  to at least ``min_size`` px) and captions all crops of the batch with a wrapped captioner backend.
- ``gpt4roi``: the paper's GPT4RoI, in ``annotators/region_captioner_gpt4roi.py``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from annotators import box_prompt
from annotators._hf import VlmBackend, clean_pairs
from annotators.base import AnnotatorError, Backend, check_batch, config_kwargs
from annotators.prompts import PromptChoice, image_digest
from data_schemas import RegionCaption

logger = logging.getLogger(__name__)

DEFAULT_REGION_PROMPT = "What is in the region {box}? Answer briefly."


def as_boxes(boxes: Any) -> np.ndarray:
    """``boxes`` as float32 (N, 4); ``ValueError`` naming the shape otherwise."""
    array = np.asarray(boxes, dtype=np.float32)
    if array.size == 0:
        return array.reshape(0, 4)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4) xyxy, got {array.shape}")
    return array


def crop_box(image: Image.Image, box_xyxy: Sequence[float], pad: float, min_size: int) -> Image.Image:
    """The box grown by ``pad`` x its width/height per side, then to ``min_size`` px around its centre, clipped to
    the image (at least 1 px), and cropped."""
    width, height = image.size
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    pad_x, pad_y = pad * (x2 - x1), pad * (y2 - y1)
    x1, x2 = _grow(x1 - pad_x, x2 + pad_x, min_size, width)
    y1, y2 = _grow(y1 - pad_y, y2 + pad_y, min_size, height)
    return image.crop((x1, y1, x2, y2))


def _grow(lo: float, hi: float, min_size: int, limit: int) -> tuple[int, int]:
    if hi - lo < min_size:
        centre = (lo + hi) / 2
        lo, hi = centre - min_size / 2, centre + min_size / 2
    lo_px = min(max(math.floor(lo), 0), limit - 1)
    hi_px = max(min(math.ceil(hi), limit), lo_px + 1)
    return lo_px, hi_px


def _flatten(images: Sequence[Image.Image], boxes_per_image: Sequence[Any]) -> tuple[list[np.ndarray], list[tuple]]:
    """Validated boxes per image and the flat list of ``(image_index, box)`` jobs."""
    check_batch(images, boxes_per_image)
    boxes = [as_boxes(b) for b in boxes_per_image]
    return boxes, [(i, box) for i, image_boxes in enumerate(boxes) for box in image_boxes]


def _regroup(boxes: list[np.ndarray], flat: list[list[RegionCaption]]) -> list[list[list[RegionCaption]]]:
    out, start = [], 0
    for image_boxes in boxes:
        out.append(flat[start : start + len(image_boxes)])
        start += len(image_boxes)
    return out


class VlmBoxCaptioner(VlmBackend):
    """Shikra-style region captions: one prompt per box with its coordinates in the model-input frame.

    ``box_format`` names the model family (``annotators/box_prompt.py``): ``shikra`` / ``llava-1.5`` pad the image
    to a square (as those models were trained) and write 3 / 2 decimals; ``plain`` uses the processor's own
    frame. The prompt box is mapped through the same padding, resize and centre crop as the pixels; a box the
    crop removes gets no caption. ``prompts`` + ``prompts_per_region`` draw that many distinct prompts per box
    (seeded by ``seed``, the image's content and the box), each answered separately.
    """

    kind: ClassVar[str] = "region_captioner"
    name: ClassVar[str] = "vlm-box"

    def __init__(
        self,
        *,
        model: str,
        box_format: str = "shikra",
        prompt: str | None = None,
        prompts: str | list[str] | None = None,
        prompts_per_region: int = 1,
        seed: int = 0,
        max_new_tokens: int = 20,
        num_beams: int = 1,
        num_return_sequences: int = 1,
        generate_kwargs: Mapping[str, Any] | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 16,
        shared_prefix: bool = True,
        engine: str = "hf",
        engine_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        choice = PromptChoice(prompt, prompts, prompts_per_region, seed, default=DEFAULT_REGION_PROMPT,
                              placeholder="{box}")
        super().__init__(
            model=model, prompts=choice, max_new_tokens=max_new_tokens, num_beams=num_beams,
            num_return_sequences=num_return_sequences, generate_kwargs=generate_kwargs, device=device, dtype=dtype,
            batch_size=batch_size, shared_prefix=shared_prefix, engine=engine, engine_kwargs=engine_kwargs,
        )
        self.box_format = box_prompt.box_format(box_format)
        self.frame: box_prompt.ProcessorFrame | None = None

    def load(self) -> None:
        super().load()
        self.frame = box_prompt.ProcessorFrame.from_processor(self.generator.processor.image_processor)

    def model_inputs(self, images: Sequence[Image.Image], boxes: list[np.ndarray]) -> tuple[list, list]:
        """Per image: the image the model gets (padded to square when the family expects it) and its prompt
        boxes (``None`` where the model cannot see the box)."""
        if self.frame is None:
            raise AnnotatorError("call load() before captioning")
        fmt, fill = self.box_format, box_prompt.pad_fill(self.box_format, self.generator.processor.image_processor)
        inputs, texts = [], []
        for image, image_boxes in zip(images, boxes, strict=True):
            rgb = image.convert("RGB")
            texts.append(box_prompt.prompt_boxes(image_boxes, rgb.width, rgb.height, self.frame, fmt))
            inputs.append(box_prompt.pad_to_square(rgb, fill) if fmt.pad_to_square else rgb)
        return inputs, texts

    def __call__(
        self, images: Sequence[Image.Image], boxes_per_image: Sequence[Any]
    ) -> list[list[list[RegionCaption]]]:
        boxes, _ = _flatten(images, boxes_per_image)
        inputs, box_texts = self.model_inputs(images, boxes)
        keys = [image_digest(image) for image in inputs]
        jobs = []  # (flat box index, image index, prompt)
        for flat_index, (i, j) in enumerate((i, j) for i, b in enumerate(boxes) for j in range(len(b))):
            if box_texts[i][j] is not None:
                prompts = self.prompts.for_item(keys[i], box_texts[i][j])
                jobs += [(flat_index, i, p.format(box=box_texts[i][j])) for p in prompts]
        pairs: list[list[tuple[str, str | None]]] = [[] for _ in range(sum(len(b) for b in boxes))]
        texts = self.generator.generate_jobs(inputs, [(i, p) for _, i, p in jobs], self.batch_size)
        for (flat_index, _, prompt), job_texts in zip(jobs, texts, strict=True):
            pairs[flat_index] += [(t, prompt) for t in job_texts]
        flat = [[RegionCaption(text=t, annotator=self.name, prompt=p) for t, p in clean_pairs(ps)] for ps in pairs]
        return _regroup(boxes, flat)


class CropCaptioner(Backend):
    """Caption padded box crops with any ``captioner`` backend (one call over all crops of the batch)."""

    kind: ClassVar[str] = "region_captioner"
    name: ClassVar[str] = "crop"

    def __init__(self, *, captioner: Any, pad: float = 0.1, min_size: int = 16) -> None:
        if pad < 0 or min_size < 1:
            raise AnnotatorError(f"crop: pad must be >= 0 and min_size >= 1, got pad={pad}, min_size={min_size}")
        self.captioner, self.pad, self.min_size = captioner, pad, min_size

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> CropCaptioner:
        from annotators.registry import build

        kwargs = config_kwargs(cls, cfg)
        if not isinstance(kwargs["captioner"], Mapping):
            raise AnnotatorError("crop: 'captioner' must be a captioner config mapping, e.g. {backend: blip2, ...}")
        kwargs["captioner"] = build("captioner", kwargs["captioner"])
        return cls(**kwargs)

    @classmethod
    def create_tiny(cls, out_dir: str | Path) -> dict[str, Any]:
        from annotators.captioner import Blip2Captioner

        return {"backend": cls.name, "captioner": Blip2Captioner.create_tiny(out_dir), "pad": 0.1, "min_size": 16}

    @property
    def annotator(self) -> str:
        return f"{self.name}+{self.captioner.name}"

    @property
    def version(self) -> str:
        return f"{self.captioner.name}@{self.captioner.version}"

    def load(self) -> None:
        self.captioner.load()

    def __call__(
        self, images: Sequence[Image.Image], boxes_per_image: Sequence[Any]
    ) -> list[list[list[RegionCaption]]]:
        boxes, jobs = _flatten(images, boxes_per_image)
        rgb = [im.convert("RGB") for im in images]
        crops = [crop_box(rgb[i], box, self.pad, self.min_size) for i, box in jobs]
        captions = self.captioner(crops) if crops else []
        flat = [[RegionCaption(text=c.text, annotator=self.annotator, prompt=c.prompt) for c in caps]
                for caps in captions]
        return _regroup(boxes, flat)

