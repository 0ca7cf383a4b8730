"""Boxes written into a VLM prompt in the frame of the pixels the model actually receives.

A region captioner prompted with ``[x1,y1,x2,y2]`` only works when those numbers locate the region in the
image tensor the vision tower sees, not in the original image. Two steps change that frame:

1. **Pad to square** (the model family's own preprocessing, done here before the processor): LLaVA-1.5 was
   trained with ``image_aspect_ratio: pad`` and Shikra with ``Expand2square``: the image is centred on a
   square canvas (offsets ``(side - w) // 2``, ``(side - h) // 2``), so a box moves by those offsets.
2. **The image processor**: CLIP-style processors (``CLIPImageProcessor``, LLaVA's) resize the shortest edge to
   ``size["shortest_edge"]`` (the long edge becomes ``int(s * long / short)``) and centre-crop ``crop_size``
   (top-left ``int((H - ch) / 2)``, ``int((W - cw) / 2)``), cutting off the sides of a non-square image;
   others resize to a fixed ``size["height"] x size["width"]``. :class:`ProcessorFrame` reads those settings
   from the loaded processor and maps pixel boxes through the same geometry.

The prompt box is the mapped box clipped to the model's input and normalised by its size, written in the
family's format (:data:`BOX_FORMATS`): Shikra ``[0.102,0.250,0.480,0.911]`` (3 decimals, Shikra's
``PlainBoxFormatter``), LLaVA-1.5 ``[0.10, 0.25, 0.48, 0.91]`` (2 decimals, its RefCOCO / VG region data).
Pure geometry: no model, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from annotators.base import AnnotatorError


@dataclass(frozen=True)
class BoxFormat:
    """How one model family wants a box: padding before the processor and the number format."""

    name: str
    pad_to_square: bool
    decimals: int
    separator: str
    pad_color: str  # "mean": the processor's image_mean (LLaVA's expand2square); "white": Shikra's default


BOX_FORMATS: dict[str, BoxFormat] = {
    "shikra": BoxFormat("shikra", pad_to_square=True, decimals=3, separator=",", pad_color="white"),
    "llava-1.5": BoxFormat("llava-1.5", pad_to_square=True, decimals=2, separator=", ", pad_color="mean"),
    # any other chat VLM with a CLIP-style processor: no padding, the processor's frame, Shikra's numbers
    "plain": BoxFormat("plain", pad_to_square=False, decimals=3, separator=",", pad_color="white"),
}


def box_format(name: str) -> BoxFormat:
    if name not in BOX_FORMATS:
        raise AnnotatorError(f"unknown box_format {name!r}; known: {', '.join(sorted(BOX_FORMATS))}")
    return BOX_FORMATS[name]


def square_offsets(width: int, height: int) -> tuple[int, int]:
    """Where an image lands on its centred square canvas: ``(dx, dy)``, the side is ``max(width, height)``."""
    side = max(width, height)
    return (side - width) // 2, (side - height) // 2


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """The RGB image centred on a ``max(w, h)`` square filled with ``fill`` (LLaVA / Shikra ``expand2square``)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, square_offsets(width, height))
    return canvas


def pad_fill(fmt: BoxFormat, image_processor: Any) -> tuple[int, int, int]:
    if fmt.pad_color == "white":
        return (255, 255, 255)
    mean = getattr(image_processor, "image_mean", None) or (0.0, 0.0, 0.0)
    return tuple(int(v * 255) for v in mean)  # LLaVA: tuple(int(x * 255) for x in image_processor.image_mean)


@dataclass(frozen=True)
class ProcessorFrame:
    """The geometry of an image processor: optional resize (shortest edge or fixed size) and centre crop.

    Attributes:
        shortest_edge: resize the short side to this (aspect kept), or None.
        resize_hw: resize to this ``(height, width)``, or None.
        crop_hw: centre crop ``(height, width)``, or None.
    """

    shortest_edge: int | None = None
    resize_hw: tuple[int, int] | None = None
    crop_hw: tuple[int, int] | None = None

    @classmethod
    def from_processor(cls, image_processor: Any) -> ProcessorFrame:
        """Read ``do_resize`` / ``size`` / ``do_center_crop`` / ``crop_size`` from a transformers image processor."""
        size = _as_dict(getattr(image_processor, "size", None)) if getattr(image_processor, "do_resize", False) else {}
        name = type(image_processor).__name__
        shortest, resize_hw = None, None
        if set(size) == {"shortest_edge"}:
            shortest = int(size["shortest_edge"])
        elif set(size) == {"height", "width"}:
            resize_hw = (int(size["height"]), int(size["width"]))
        elif size:
            raise AnnotatorError(f"{name}: box prompts need a resize by shortest_edge or to height x width, got size "
                                 f"{size}; this processor's frame is not supported")
        crop_hw = None
        if getattr(image_processor, "do_center_crop", False):
            crop = _as_dict(image_processor.crop_size)
            crop_hw = (int(crop["height"]), int(crop["width"]))
        return cls(shortest_edge=shortest, resize_hw=resize_hw, crop_hw=crop_hw)

    def resized_hw(self, height: int, width: int) -> tuple[int, int]:
        """Output ``(height, width)`` of the resize step (transformers ``get_resize_output_image_size``)."""
        if self.resize_hw is not None:
            return self.resize_hw
        if self.shortest_edge is None:
            return height, width
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def box_to_input(self, boxes_xyxy: np.ndarray, width: int, height: int) -> tuple[np.ndarray, tuple[int, int]]:
        """Pixel boxes ``(N, 4)`` of a ``width x height`` image -> boxes in the model-input pixels, clipped to it,
        and that input's ``(height, width)``."""
        new_h, new_w = self.resized_hw(height, width)
        boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4) * np.tile([new_w / width, new_h / height], 2)
        out_h, out_w = new_h, new_w
        if self.crop_hw is not None:
            out_h, out_w = self.crop_hw
            # a too-small image is zero-padded first (left/top: floor of half), then cropped at int(half)
            pad_x, pad_y = max(out_w - new_w, 0) // 2, max(out_h - new_h, 0) // 2
            left, top = int((max(new_w, out_w) - out_w) / 2), int((max(new_h, out_h) - out_h) / 2)
            boxes = boxes + np.tile([pad_x - left, pad_y - top], 2)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, out_w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, out_h)
        return boxes, (out_h, out_w)


def _as_dict(size: Any) -> dict[str, int]:
    if size is None:
        return {}
    items = size.items() if hasattr(size, "items") else vars(size).items()
    return {k: v for k, v in items if v is not None}


def format_box(box_normalised: Sequence[float], fmt: BoxFormat) -> str:
    """``[x1,y1,x2,y2]`` in ``[0, 1]`` as the family writes it."""
    return "[" + fmt.separator.join(f"{min(max(float(c), 0.0), 1.0):.{fmt.decimals}f}" for c in box_normalised) + "]"


def prompt_boxes(
    boxes_xyxy: np.ndarray, width: int, height: int, frame: ProcessorFrame, fmt: BoxFormat, min_side: float = 1.0
) -> list[str | None]:
    """Box strings for the boxes ``(N, 4)`` of a ``width x height`` image, in the frame of the pixels the model
    receives: padded to square first when ``fmt`` says so (the caller pads the image the same way). ``None`` for
    a box the model cannot see: less than ``min_side`` input pixels wide or high after the crop (e.g. a region
    at the side of a wide image under a centre crop)."""
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    if fmt.pad_to_square:
        dx, dy = square_offsets(width, height)
        boxes = boxes + [dx, dy, dx, dy]
        width = height = max(width, height)
    mapped, (out_h, out_w) = frame.box_to_input(boxes, width, height)
    visible = (mapped[:, 2] - mapped[:, 0] >= min_side) & (mapped[:, 3] - mapped[:, 1] >= min_side)
    return [format_box(box / [out_w, out_h, out_w, out_h], fmt) if ok else None for box, ok in zip(mapped, visible)]
