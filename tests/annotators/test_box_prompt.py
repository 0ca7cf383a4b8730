"""Prompt boxes in the frame of the model input: a box drawn on the image, run through the family's padding and
the real transformers image processor (built locally with LLaVA-1.5's settings), lands on the pixels the prompt
box names."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image, ImageDraw
from transformers import BlipImageProcessor, CLIPImageProcessor

from annotators import AnnotatorError
from annotators.box_prompt import (
    BOX_FORMATS,
    ProcessorFrame,
    box_format,
    format_box,
    pad_fill,
    pad_to_square,
    prompt_boxes,
)


def llava_processor(side: int = 336) -> CLIPImageProcessor:
    """``llava-hf/llava-1.5-7b-hf``'s image processor settings (shortest edge 336, centre crop 336, bicubic)."""
    return CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                              do_normalize=False)


def drawn(width: int, height: int, box) -> Image.Image:
    image = Image.new("RGB", (width, height), (0, 0, 0))
    ImageDraw.Draw(image).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(255, 255, 255))
    return image


def bright_box(pixels) -> np.ndarray:
    """Tight box ``(x1, y1, x2, y2)`` (exclusive) of the bright pixels of a ``(3, H, W)`` tensor in [0, 1]."""
    bright = pixels.numpy().mean(axis=0) > 0.75
    cols, rows = np.flatnonzero(bright.any(axis=0)), np.flatnonzero(bright.any(axis=1))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float64)


def parse(text: str) -> np.ndarray:
    return np.array([float(v) for v in re.findall(r"\d+\.\d+", text)])


CASES = [  # (width, height, box): landscape, portrait (tall), small, a box cut by the centre crop
    (640, 480, (100, 60, 300, 400)),
    (300, 500, (40, 120, 260, 330)),
    (120, 90, (10, 10, 60, 40)),
    (800, 400, (100, 100, 300, 300)),
]


@pytest.mark.parametrize("family", sorted(BOX_FORMATS))
@pytest.mark.parametrize(("width", "height", "box"), CASES)
def test_drawn_box_lands_where_the_prompt_says(family, width, height, box):
    processor = llava_processor()
    fmt = box_format(family)
    image = drawn(width, height, box)
    if fmt.pad_to_square:
        image = pad_to_square(image, (0, 0, 0))
    pixels = processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert tuple(pixels.shape) == (3, 336, 336)
    (text,) = prompt_boxes(np.array([box]), width, height, ProcessorFrame.from_processor(processor), fmt)
    said = parse(text) * 336
    seen = bright_box(pixels)
    # bicubic edges: 1 px; the printed decimals: half a unit of the last digit
    tolerance = 1.0 + 0.5 * 10 ** -fmt.decimals * 336
    np.testing.assert_allclose(said, seen, atol=tolerance)


def test_the_old_original_image_frame_is_wrong_under_centre_crop():
    # without the processor frame a box on the left of a 800 x 400 image is read ~ 84 px off
    width, height, box = 800, 400, (200, 100, 400, 300)
    pixels = llava_processor()(images=drawn(width, height, box), return_tensors="pt")["pixel_values"][0]
    naive = np.array(box, float) / [width, height, width, height] * 336
    assert np.abs(naive - bright_box(pixels)).max() > 50
    (text,) = prompt_boxes(np.array([box]), width, height, ProcessorFrame.from_processor(llava_processor()),
                           box_format("plain"))
    assert text == "[0.000,0.250,0.500,0.750]"  # x: 200 * 0.84 - 168 = 0, 400 * 0.84 - 168 = 168 of 336


def test_a_box_the_centre_crop_removes_gets_no_prompt():
    frame = ProcessorFrame.from_processor(llava_processor())
    boxes = np.array([(10, 100, 150, 300), (100, 100, 300, 300)])
    hidden, cut = prompt_boxes(boxes, 800, 400, frame, box_format("plain"))
    assert hidden is None and cut == "[0.000,0.250,0.250,0.750]"
    assert None not in prompt_boxes(boxes, 800, 400, frame, box_format("llava-1.5"))  # padding keeps everything


def test_fixed_size_processor_frame():
    processor = BlipImageProcessor(size={"height": 64, "width": 96}, do_normalize=False)
    frame = ProcessorFrame.from_processor(processor)
    assert frame == ProcessorFrame(resize_hw=(64, 96))
    box = (30, 20, 90, 60)
    pixels = processor(images=drawn(120, 80, box), return_tensors="pt")["pixel_values"][0]
    (text,) = prompt_boxes(np.array([box]), 120, 80, frame, box_format("plain"))
    np.testing.assert_allclose(parse(text) * [96, 64, 96, 64], bright_box(pixels), atol=1.1)


def test_formats_and_padding():
    assert format_box([0.1023, 0.25, 0.48, 1.2], BOX_FORMATS["shikra"]) == "[0.102,0.250,0.480,1.000]"
    assert format_box([0.1023, 0.25, 0.48, 0.911], BOX_FORMATS["llava-1.5"]) == "[0.10, 0.25, 0.48, 0.91]"
    padded = pad_to_square(Image.new("RGB", (40, 10), (9, 9, 9)), (1, 2, 3))
    assert padded.size == (40, 40) and padded.getpixel((0, 0)) == (1, 2, 3) and padded.getpixel((0, 15)) == (9, 9, 9)
    assert pad_fill(BOX_FORMATS["llava-1.5"], llava_processor()) == (122, 116, 104)
    assert pad_fill(BOX_FORMATS["shikra"], llava_processor()) == (255, 255, 255)


def test_unsupported_processor_and_format_are_named():
    processor = CLIPImageProcessor(size={"shortest_edge": 32, "longest_edge": 64})
    with pytest.raises(AnnotatorError, match="CLIPImageProcessor: box prompts need"):
        ProcessorFrame.from_processor(processor)
    with pytest.raises(AnnotatorError, match="unknown box_format 'kosmos'; known: llava-1.5, plain, shikra"):
        box_format("kosmos")
