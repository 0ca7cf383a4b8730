"""Region captioners (DESIGN.md "Annotation stages" 4): ``(images, boxes_per_image) -> [image][box][RegionCaption]``.

Boxes are float arrays (N_i, 4) xyxy in pixels of their image; N_i may be 0. Captions per box are stripped,
deduplicated and non-empty (a box may get an empty list when the model produced only whitespace).

- ``VlmBoxCaptioner`` (``vlm-box``): Shikra-style box-in-prompt. The box is written into the prompt as
  normalised ``[x1,y1,x2,y2]`` with 3 decimals (Shikra's format, e.g. ``[0.102,0.250,0.480,0.911]``); same model
  loading as the ``vlm`` captioner; all boxes of the batch are flattened and generated in chunks of ``batch_size``.
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

from annotators._hf import VlmBackend, chunks, clean_texts
from annotators.base import AnnotatorError, Backend, check_batch, config_kwargs
from data_schemas import RegionCaption

logger = logging.getLogger(__name__)



def as_boxes(boxes: Any) -> np.ndarray:
    """``boxes`` as float32 (N, 4); ``ValueError`` naming the shape otherwise."""
    array = np.asarray(boxes, dtype=np.float32)
    if array.size == 0:
        return array.reshape(0, 4)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4) xyxy, got {array.shape}")
    return array


def shikra_box(box_xyxy: Sequence[float], width: int, height: int) -> str:
    """Pixel box -> Shikra's normalised ``[x1,y1,x2,y2]`` string (3 decimals, clipped to [0, 1])."""
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    coords = [x1 / width, y1 / height, x2 / width, y2 / height]
    return "[" + ",".join(f"{min(max(c, 0.0), 1.0):.3f}" for c in coords) + "]"


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
    """Shikra-style region captions: one prompt per box with its normalised coordinates (module docstring)."""

    kind: ClassVar[str] = "region_captioner"
    name: ClassVar[str] = "vlm-box"

    def __init__(
        self,
        *,
        model: str,
        prompt: str = "What is in the region {box}? Answer briefly.",
        max_new_tokens: int = 20,
        num_beams: int = 1,
        num_return_sequences: int = 1,
        generate_kwargs: Mapping[str, Any] | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 16,
    ) -> None:
        if "{box}" not in prompt:
            raise AnnotatorError(f"vlm-box prompt {prompt!r} needs a '{{box}}' placeholder")
        super().__init__(
            model=model, prompt=prompt, max_new_tokens=max_new_tokens, num_beams=num_beams,
            num_return_sequences=num_return_sequences, generate_kwargs=generate_kwargs, device=device, dtype=dtype,
            batch_size=batch_size,
        )

    def __call__(
        self, images: Sequence[Image.Image], boxes_per_image: Sequence[Any]
    ) -> list[list[list[RegionCaption]]]:
        boxes, jobs = _flatten(images, boxes_per_image)
        rgb = [im.convert("RGB") for im in images]
        flat: list[list[RegionCaption]] = []
        for batch in chunks(jobs, self.batch_size):
            prompts = [self.prompt.format(box=shikra_box(box, *rgb[i].size)) for i, box in batch]
            texts = self.generator.generate([rgb[i] for i, _ in batch], prompts)
            flat += [[RegionCaption(text=t, annotator=self.name) for t in clean_texts(ts)] for ts in texts]
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
        flat = [[RegionCaption(text=c.text, annotator=self.annotator) for c in caps] for caps in captions]
        return _regroup(boxes, flat)

