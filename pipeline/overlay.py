"""Draw a record on its image in the style of the paper's Fig. 3: masks, boxes, tags and captions."""

from __future__ import annotations

import io
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_schemas import ImageRecord
from pipeline.masks import decode_mask

PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
]
PANEL_WIDTH = 420
MASK_ALPHA = 0.45


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _paint_masks(pixels: np.ndarray, record: ImageRecord) -> np.ndarray:
    """Blend every background mask (grey) and region mask (palette colour) into ``pixels`` (H, W, 3)."""
    out = pixels.astype(np.float32)
    for bg in record.background:
        area = decode_mask(bg.rle)
        out[area] = out[area] * (1 - MASK_ALPHA / 2) + np.array((128, 128, 128)) * MASK_ALPHA / 2
    for i, region in enumerate(record.regions):
        if region.mask is None:
            continue
        area = decode_mask(region.mask.rle)
        out[area] = out[area] * (1 - MASK_ALPHA) + np.array(PALETTE[i % len(PALETTE)]) * MASK_ALPHA
    return out.clip(0, 255).astype(np.uint8)


def _panel_lines(record: ImageRecord) -> list[tuple[str, tuple[int, int, int]]]:
    black = (20, 20, 20)
    lines = [(f"{record.key}  ({record.width}x{record.height}, {record.source})", black)]
    if record.tags:
        lines.append(("tags: " + ", ".join(t.name for t in record.tags), black))
    for cap in record.captions:
        score = "" if cap.clip_score is None else f" [{cap.clip_score:.2f}]"
        lines.append((f"{'+' if cap.kept else '-'} {cap.text}{score}", black if cap.kept else (150, 150, 150)))
    for i, region in enumerate(record.regions):
        texts = "; ".join(c.text for c in region.captions[:3])
        stability = "" if region.mask is None or region.mask.stability is None else f" s={region.mask.stability:.2f}"
        lines.append((f"[{i}] {region.label} {region.score:.2f}{stability}: {texts}", PALETTE[i % len(PALETTE)]))
    if record.background:
        lines.append(("background: " + ", ".join(b.label for b in record.background), black))
    return lines


def render_overlay(record: ImageRecord, jpg: bytes) -> Image.Image:
    """The image with masks and numbered boxes, plus a side panel listing tags and captions."""
    image = Image.open(io.BytesIO(jpg)).convert("RGB")
    canvas = Image.fromarray(_paint_masks(np.asarray(image), record))
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    for i, region in enumerate(record.regions):
        colour = PALETTE[i % len(PALETTE)]
        draw.rectangle(region.box_xyxy, outline=colour, width=2)
        draw.text((region.box_xyxy[0] + 2, region.box_xyxy[1] + 1), f"{i} {region.label}", fill=colour, font=font)
    lines = [(wrapped, colour) for text, colour in _panel_lines(record) for wrapped in textwrap.wrap(text, 62)]
    line_height = 15
    height = max(canvas.height, line_height * len(lines) + 10)
    sheet = Image.new("RGB", (canvas.width + PANEL_WIDTH, height), (255, 255, 255))
    sheet.paste(canvas, (0, 0))
    panel = ImageDraw.Draw(sheet)
    for row, (text, colour) in enumerate(lines):
        panel.text((canvas.width + 8, 5 + row * line_height), text, fill=colour, font=font)
    return sheet
