"""Layout and compositing of one digit scene: coloured handwritten digits pasted on a photo crop.

Random choices are drawn from the ``numpy.random.Generator`` passed in; everything else is a pure
function of its arguments. Masks are exact: a digit's *visible* mask is its glyph minus the pixels
of digits pasted after it, and every painted digit pixel belongs to exactly one visible mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.sample_data.assets import DigitBank, load_background
from pipeline.sample_data.config import SampleConfig


@dataclass(frozen=True, eq=False)
class Placement:
    """One pasted digit: ``glyph`` (h, w) bool is tight (each border row and column holds a True).

    ``sample`` indexes ``load_digits``; ``(x, y)`` is the glyph's top-left pixel in the image.
    """

    sample: int
    digit: int
    color: str
    x: int
    y: int
    glyph: np.ndarray

    @property
    def box_xyxy(self) -> tuple[int, int, int, int]:
        """The unoccluded glyph box, ``x2``/``y2`` exclusive."""
        h, w = self.glyph.shape
        return self.x, self.y, self.x + w, self.y + h


@dataclass(frozen=True, eq=False)
class Scene:
    """A composited scene before JPEG encoding.

    ``image`` (H, W, 3) uint8; ``visible_masks`` (N, H, W) bool, one per ``placements`` entry, in paste order.
    """

    image: np.ndarray
    background: str
    placements: tuple[Placement, ...]
    visible_masks: np.ndarray
    background_named: bool = True  # SampleConfig.name_background: captions and tags carry ``background``

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


def tight_crop(mask: np.ndarray) -> np.ndarray:
    """Crop a (h, w) bool mask to the rows and columns that hold a True (unchanged if empty)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return mask
    return mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def digit_glyph(
    digit_image: np.ndarray,
    height: int,
    aspect_jitter: float,
    threshold: float,
    max_width: int,
    upsample: str = "bicubic",
    max_height: int | None = None,
) -> np.ndarray:
    """Upscale an 8×8 ``load_digits`` image to a crisp, tight glyph mask about ``height`` px tall.

    The ink cells (intensity/16 >= ``threshold``) plus a one-cell zero margin are cut out, so the glyph
    keeps the digit's own aspect ratio (a "one" is narrow), times ``aspect_jitter``, and strokes end
    round instead of being clipped at the crop; upscaling and the same threshold give smooth strokes.

    Args:
        digit_image: (8, 8) float intensities in [0, 16].
        height: target glyph height in px (>= 1): the ink rows are scaled to this height.
        aspect_jitter: multiplies the natural width/height ratio.
        threshold: intensity in (0, 1) at or above which a pixel is ink.
        max_width: the glyph is never wider than this.
        max_height: nor taller than this (the interpolation halo can add a px or two to ``height``).
        upsample: "nearest", "bilinear" or "bicubic" (PIL resampling of the float image).
    Returns:
        (h, w) bool, non-empty, ``w <= max_width``, ``h <= max_height``; ``h`` is within a few px of ``height``.
    """
    norm = np.pad(np.asarray(digit_image, dtype=np.float32) / 16.0, 1)
    threshold = min(threshold, float(norm.max()))
    ink = norm >= threshold
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    cells = norm[rows[0] - 1 : rows[-1] + 2, cols[0] - 1 : cols[-1] + 2]
    cell_h = height / (rows[-1] - rows[0] + 1)
    cell_w = min(cell_h * aspect_jitter, max_width / (cols[-1] - cols[0] + 1))
    out_h, out_w = max(1, round(cells.shape[0] * cell_h)), max(1, round(cells.shape[1] * cell_w))
    upscaled = np.asarray(Image.fromarray(np.ascontiguousarray(cells)).resize((out_w, out_h), _RESAMPLE[upsample]))
    glyph = upscaled >= threshold
    if not glyph.any():  # a faint digit whose peak falls between pixel centres
        glyph = upscaled >= upscaled.max()
    return tight_crop(tight_crop(glyph)[:max_height, :max_width])


def place_mask(glyph: np.ndarray, x: int, y: int, height: int, width: int) -> np.ndarray:
    """Paste a (h, w) glyph at top-left ``(x, y)`` into an empty (height, width) bool canvas."""
    canvas = np.zeros((height, width), dtype=bool)
    h, w = glyph.shape
    canvas[y : y + h, x : x + w] = glyph
    return canvas


def visible_masks(full_masks: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Occlusion in paste order: each (H, W) mask loses the pixels of every later mask.

    Args:
        full_masks: N unoccluded (H, W) bool masks, first pasted first.
    Returns:
        (N, H, W) bool visible masks (pairwise disjoint).
    """
    full = np.asarray(full_masks, dtype=bool)
    visible = np.zeros_like(full)
    covered = np.zeros(full.shape[1:], dtype=bool)
    for i in range(len(full) - 1, -1, -1):
        visible[i] = full[i] & ~covered
        covered |= full[i]
    return visible


def _boxes_overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _find_position(
    rng: np.random.Generator,
    cfg: SampleConfig,
    glyph: np.ndarray,
    placed: list[Placement],
    full: list[np.ndarray],
    height: int,
    width: int,
) -> tuple[int, int] | None:
    """Top-left for ``glyph``: clear of earlier boxes, or (occlusion) over one while every earlier digit keeps
    ``min_visible_frac`` of its pixels. None when ``placement_tries`` positions all fail."""
    gh, gw = glyph.shape
    for _ in range(cfg.placement_tries):
        occlude = bool(placed) and rng.random() < cfg.occlusion_prob
        if occlude:
            x1, y1, x2, y2 = placed[int(rng.integers(len(placed)))].box_xyxy
            cx, cy = rng.uniform(x1, x2), rng.uniform(y1, y2)
            x = int(np.clip(round(cx - gw / 2), 0, width - gw))
            y = int(np.clip(round(cy - gh / 2), 0, height - gh))
        else:
            x, y = int(rng.integers(0, width - gw + 1)), int(rng.integers(0, height - gh + 1))
        box = (x, y, x + gw, y + gh)
        if not occlude:
            if not any(_boxes_overlap(box, p.box_xyxy) for p in placed):
                return x, y
            continue
        visible = visible_masks([*full, place_mask(glyph, x, y, height, width)])
        kept = [visible[i].sum() >= cfg.min_visible_frac * full[i].sum() for i in range(len(full))]
        if all(kept):
            return x, y
    return None


def plan_digits(
    rng: np.random.Generator, cfg: SampleConfig, bank: DigitBank, pool: np.ndarray, height: int, width: int
) -> list[Placement]:
    """Choose 1..N digits (samples from ``pool``), colours, sizes and positions for a (height, width) image.

    Colours are distinct within an image while the palette has enough of them. A digit that finds no
    valid position in ``cfg.placement_tries`` tries is left out, so the count can fall below the drawn one
    (never below 1: the first digit always fits).
    """
    lo, hi = cfg.digits_per_image
    n_digits = int(rng.integers(lo, hi + 1))
    names = sorted(cfg.palette)  # sorted: a config reloaded from summary.json (sorted keys) gives the same scenes
    color_ids = rng.choice(len(names), size=n_digits, replace=n_digits > len(names))
    short = min(height, width)
    placed: list[Placement] = []
    full: list[np.ndarray] = []
    for color_id in color_ids:
        sample = int(pool[int(rng.integers(len(pool)))])
        glyph_height = int(np.clip(round(rng.uniform(*cfg.digit_height_frac) * short), 4, height))
        glyph = digit_glyph(
            bank.images[sample],
            glyph_height,
            rng.uniform(*cfg.digit_aspect_jitter),
            cfg.mask_threshold,
            width,
            cfg.upsample,
            max_height=height,
        )
        position = _find_position(rng, cfg, glyph, placed, full, height, width)
        if position is None:
            continue
        x, y = position
        placed.append(Placement(sample, int(bank.labels[sample]), names[int(color_id)], x, y, glyph))
        full.append(place_mask(glyph, x, y, height, width))
    return placed


def sample_crop_box(
    rng: np.random.Generator, photo_hw: tuple[int, int], width: int, height: int, crop_frac: tuple[float, float]
) -> tuple[float, float, float, float]:
    """A random ``(x1, y1, x2, y2)`` crop of a photo with the target's aspect ratio, side ``crop_frac`` of the max."""
    photo_h, photo_w = photo_hw
    aspect = width / height
    crop_h = max(1.0, rng.uniform(*crop_frac) * min(photo_h, photo_w / aspect))
    crop_w = crop_h * aspect
    x1, y1 = rng.uniform(0, photo_w - crop_w), rng.uniform(0, photo_h - crop_h)
    return float(x1), float(y1), float(x1 + crop_w), float(y1 + crop_h)


def resize_crop(photo: np.ndarray, box_xyxy: tuple[float, float, float, float], width: int, height: int) -> np.ndarray:
    """Bilinear resample of ``photo`` (Hs, Ws, 3) uint8 inside ``box_xyxy`` to (height, width, 3) uint8."""
    resized = Image.fromarray(photo).resize((width, height), Image.Resampling.BILINEAR, box=box_xyxy)
    return np.asarray(resized, dtype=np.uint8)


def render_scene(
    background: np.ndarray, placements: Sequence[Placement], palette: Mapping[str, tuple[int, int, int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Paint each glyph in its colour, in order, over a copy of ``background`` (H, W, 3) uint8.

    Returns:
        image (H, W, 3) uint8 and visible masks (N, H, W) bool.
    """
    height, width = background.shape[:2]
    image = background.copy()
    full = [place_mask(p.glyph, p.x, p.y, height, width) for p in placements]
    for placement, mask in zip(placements, full, strict=True):
        image[mask] = palette[placement.color]
    visible = visible_masks(full) if full else np.zeros((0, height, width), dtype=bool)
    return image, visible


def make_scene(rng: np.random.Generator, cfg: SampleConfig, bank: DigitBank, pool: np.ndarray) -> Scene:
    """Draw one complete scene: size, background (photo and crop, or a flat colour), digits, compositing."""
    width = int(rng.integers(cfg.image_side[0], cfg.image_side[1] + 1))
    height = int(rng.integers(cfg.image_side[0], cfg.image_side[1] + 1))
    if cfg.flat_backgrounds:
        names = list(cfg.flat_backgrounds)
        label = names[int(rng.integers(len(names)))]
        background = np.full((height, width, 3), cfg.flat_backgrounds[label], dtype=np.uint8)
    else:
        label = cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))]
        photo = load_background(label)
        box = sample_crop_box(rng, photo.shape[:2], width, height, cfg.crop_frac)
        background = resize_crop(photo, box, width, height)
    placements = plan_digits(rng, cfg, bank, pool, height, width)
    image, visible = render_scene(background, placements, cfg.palette)
    return Scene(image=image, background=label, placements=tuple(placements), visible_masks=visible,
                 background_named=cfg.name_background)
