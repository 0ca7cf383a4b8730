"""Layout and compositing of digit scenes: pure functions checked on hand-built and generated scenes."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.sample_data import SampleConfig, scene_for
from pipeline.sample_data.assets import load_background, load_digit_bank, split_counts, split_digit_samples
from pipeline.sample_data.config import BACKGROUND_LOADERS, SPLITS
from pipeline.sample_data.scenes import Placement, digit_glyph, place_mask, render_scene, tight_crop, visible_masks


def _is_tight(mask: np.ndarray) -> bool:
    return bool(mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any())


@pytest.mark.parametrize("height", [20, 57, 160])
def test_digit_glyph_is_tight_and_about_the_asked_height(height):
    bank = load_digit_bank()
    for sample in range(20):
        glyph = digit_glyph(bank.images[sample], height, 1.0, 0.4, max_width=400)
        assert glyph.dtype == bool and _is_tight(glyph)
        assert abs(glyph.shape[0] - height) <= max(2, 0.06 * height)


def test_digit_glyph_respects_max_width_and_threshold_fallback():
    bank = load_digit_bank()
    glyph = digit_glyph(bank.images[0], 100, 3.0, 0.4, max_width=30)
    assert glyph.shape[1] <= 30 and glyph.any()
    faint = bank.images[0] * 0.1  # peak 1.6/16 stays under every threshold
    assert digit_glyph(faint, 40, 1.0, 0.9, max_width=100).any()


def test_tight_crop_and_place_mask():
    mask = np.zeros((6, 7), dtype=bool)
    mask[2:4, 1:5] = True
    assert tight_crop(mask).shape == (2, 4)
    placed = place_mask(tight_crop(mask), 3, 1, 5, 8)
    assert placed.shape == (5, 8) and placed.sum() == 8 and placed[1:3, 3:7].all()


def test_visible_masks_later_digits_occlude_earlier():
    first = np.zeros((4, 4), dtype=bool)
    first[:, :3] = True
    second = np.zeros((4, 4), dtype=bool)
    second[:, 2:] = True
    visible = visible_masks([first, second])
    assert visible[1].sum() == 8 and visible[0].sum() == 8
    assert not (visible[0] & visible[1]).any()
    assert (visible.any(axis=0) == (first | second)).all()


def test_render_paints_each_visible_mask_in_its_colour():
    scene = scene_for(5, "train", 0, SampleConfig(occlusion_prob=1.0, digits_per_image=(4, 5)))
    rng = np.random.default_rng(0)
    background = rng.integers(0, 256, size=(scene.height, scene.width, 3), dtype=np.uint8)
    palette = SampleConfig().palette
    image, visible = render_scene(background, scene.placements, palette)
    assert (visible == scene.visible_masks).all()
    for placement, mask in zip(scene.placements, visible, strict=True):
        assert (image[mask] == palette[placement.color]).all()
    outside = ~visible.any(axis=0)
    assert (image[outside] == background[outside]).all()


def _scenes(cfg: SampleConfig, count: int, split: str = "train"):
    return [scene_for(11, split, i, cfg) for i in range(count)]


def test_generated_scenes_stay_within_configured_ranges():
    cfg = SampleConfig()
    counts = []
    for scene in _scenes(cfg, 40):
        assert cfg.image_side[0] <= scene.width <= cfg.image_side[1]
        assert cfg.image_side[0] <= scene.height <= cfg.image_side[1]
        assert scene.image.shape == (scene.height, scene.width, 3) and scene.image.dtype == np.uint8
        assert scene.background in cfg.backgrounds
        counts.append(len(scene.placements))
        assert cfg.digits_per_image[0] <= len(scene.placements) <= cfg.digits_per_image[1]
        short = min(scene.width, scene.height)
        for placement, visible in zip(scene.placements, scene.visible_masks, strict=True):
            h, w = placement.glyph.shape
            assert cfg.digit_height_frac[0] * short * 0.94 - 2 <= h <= cfg.digit_height_frac[1] * short * 1.06 + 2
            assert h >= 32  # well above a 16 px patch
            x1, y1, x2, y2 = placement.box_xyxy
            assert 0 <= x1 < x2 <= scene.width and 0 <= y1 < y2 <= scene.height
            assert placement.color in cfg.palette
            assert visible.sum() >= cfg.min_visible_frac * placement.glyph.sum()
        assert not (scene.visible_masks.sum(axis=0) > 1).any()
    assert len(set(counts)) >= 3 and max(counts) >= 4


def test_occlusion_happens_and_is_exact():
    cfg = SampleConfig(occlusion_prob=1.0, digits_per_image=(3, 5))
    occluded = 0
    for scene in _scenes(cfg, 12):
        for placement, visible in zip(scene.placements, scene.visible_masks, strict=True):
            full = place_mask(placement.glyph, placement.x, placement.y, scene.height, scene.width)
            assert not (visible & ~full).any()
            occluded += int(visible.sum() < full.sum())
    assert occluded >= 5


def test_custom_config_sizes_and_counts():
    cfg = SampleConfig(
        image_side=(256, 256), digits_per_image=(2, 2), digit_height_frac=(0.25, 0.25), backgrounds=("coffee",)
    )
    for scene in _scenes(cfg, 6):
        assert (scene.height, scene.width) == (256, 256) and scene.background == "coffee"
        assert len(scene.placements) == 2
        assert all(abs(p.glyph.shape[0] - 64) <= 4 for p in scene.placements)


def test_digits_as_large_as_the_image_still_fit():
    cfg = SampleConfig(image_side=(48, 64), digit_height_frac=(1.0, 1.0), digit_aspect_jitter=(3.0, 3.0))
    for scene in _scenes(cfg, 10):
        for placement in scene.placements:
            x1, y1, x2, y2 = placement.box_xyxy
            assert 0 <= x1 < x2 <= scene.width and 0 <= y1 < y2 <= scene.height


def test_split_counts_follow_fractions():
    for n in [0, 1, 7, 12, 64, 101]:
        counts = split_counts(n, [0.8, 0.1, 0.1])
        assert sum(counts) == n
        assert all(abs(c - n * f) < 1 for c, f in zip(counts, [0.8, 0.1, 0.1], strict=True))
    assert split_counts(12, [0.8, 0.1, 0.1]) == [10, 1, 1]


def test_digit_pools_are_disjoint_stratified_and_seeded():
    labels = load_digit_bank().labels
    fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
    pools = split_digit_samples(labels, fractions, seed=0)
    joined = np.concatenate([pools[s] for s in SPLITS])
    assert np.array_equal(np.sort(joined), np.arange(len(labels)))
    for split in SPLITS:
        assert set(labels[pools[split]].tolist()) == set(range(10))
        assert abs(len(pools[split]) - fractions[split] * len(labels)) <= 10
    again = split_digit_samples(labels, fractions, seed=0)
    other = split_digit_samples(labels, fractions, seed=1)
    assert all(np.array_equal(pools[s], again[s]) for s in SPLITS)
    assert not np.array_equal(pools["val"], other["val"])


def test_val_and_test_scenes_use_held_back_digits():
    cfg = SampleConfig()
    train_samples = {p.sample for s in _scenes(cfg, 30, "train") for p in s.placements}
    for split in ("val", "test"):
        held = {p.sample for s in _scenes(cfg, 10, split) for p in s.placements}
        assert held and not held & train_samples


@pytest.mark.parametrize("label", sorted(BACKGROUND_LOADERS))
def test_backgrounds_load_offline_as_rgb(label):
    photo = load_background(label)
    assert photo.ndim == 3 and photo.shape[2] == 3 and photo.dtype == np.uint8
    assert min(photo.shape[:2]) >= 150


@pytest.mark.parametrize(
    "bad",
    [
        {"split_fractions": {"train": 0.8, "val": 0.1, "test": 0.2}},
        {"split_fractions": {"train": 1.0}},
        {"backgrounds": ("mars",)},
        {"digits_per_image": (4, 2)},
        {"palette": {"Dark Red": (1, 2, 3)}},
        {"palette": {"red": (1, 2, 300)}},
        {"unknown_field": 1},
    ],
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValidationError):
        SampleConfig(**bad)


def test_palette_order_does_not_change_scenes():
    palette = SampleConfig().palette
    reordered = SampleConfig(palette=dict(reversed(list(palette.items()))))
    for index in range(3):
        a, b = scene_for(2, "train", index), scene_for(2, "train", index, reordered)
        assert np.array_equal(a.image, b.image) and [p.color for p in a.placements] == [p.color for p in b.placements]


def test_placement_box():
    placement = Placement(sample=0, digit=0, color="red", x=3, y=4, glyph=np.ones((5, 2), dtype=bool))
    assert placement.box_xyxy == (3, 4, 5, 9)
