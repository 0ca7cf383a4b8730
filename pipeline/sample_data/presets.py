"""Named ``SampleConfig`` presets: a ladder from a learnable digit test bed up to the cluttered default.

Why a ladder (DESIGN.md "Mind the easy cue"): on the cluttered default scenes, colour and background
words solve the contrastive task and a small model learns no digit identity, so a loss ablation about
categories sits at chance for every variant. The ladder starts where the category is the cue that pays
(one colour, one background, large crisp glyphs) and adds one kind of difficulty per rung, ending at the
default, so an experiment can find how far up the effect survives.

Each rung is a dict of ``SampleConfig`` field overrides, cumulative (a rung keeps everything of the rung
below and changes the listed fields); ``preset_config(name)`` validates it into a ``SampleConfig``. The
``default`` rung has no overrides: ``--preset default`` writes the same bytes as no preset.

| rung | adds | digits | height (of short side) | upsample | colours | backgrounds |
|---|---|---|---|---|---|---|
| ``learnable`` | - | 1-3 | 0.45-0.7 | nearest | 1 (white) | 1 (grass) |
| ``backgrounds`` | all 12 photos | 1-3 | 0.45-0.7 | nearest | 1 | 12 |
| ``colors`` | the 8-colour palette | 1-3 | 0.45-0.7 | nearest | 8 | 12 |
| ``small`` | smaller, smooth glyphs | 1-3 | 0.35-0.6 | bicubic | 8 | 12 |
| ``default`` | up to 5 digits, smaller still | 1-5 | 0.2-0.5 | bicubic | 8 | 12 |

``learnable`` is the setting issue 9 measured to show the region-caption effect on digit identity
(one colour, one background, 0.45-0.7, nearest; meant for ``umg-ablation-vit``, patch 8 at 64 px).
``colors`` brings back the colour word that the region captions and tags always name: the shortcut cue.

Two probes beside the ladder (not rungs; ``PROBES``) split what ``backgrounds`` adds to ``learnable`` —
visual clutter and a background word in every caption — into its two parts:

| probe | = | clutter (textured photos) | background word in captions / tags |
|---|---|---|---|
| ``backgrounds_unnamed`` | ``backgrounds`` + ``name_background: false`` | yes (12 photos) | no |
| ``flat_named`` | ``learnable`` + 12 ``flat_backgrounds`` | no (flat colours) | yes (12 colour words) |
"""

from __future__ import annotations

from typing import Any

from pipeline.sample_data.config import DEFAULT_PALETTE, SampleConfig

_LEARNABLE: dict[str, Any] = {
    "digits_per_image": (1, 3),
    "digit_height_frac": (0.45, 0.7),
    "upsample": "nearest",
    "palette": {"white": DEFAULT_PALETTE["white"]},
    "backgrounds": ("grass",),
}
_BACKGROUNDS: dict[str, Any] = {k: v for k, v in _LEARNABLE.items() if k != "backgrounds"}
_COLORS: dict[str, Any] = {k: v for k, v in _BACKGROUNDS.items() if k != "palette"}
_SMALL: dict[str, Any] = {**_COLORS, "digit_height_frac": (0.35, 0.6), "upsample": "bicubic"}
# 12 flat background colours, none of them the digits' white, each named by one word.
FLAT_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 30), "green": (30, 150, 50), "blue": (30, 60, 200), "yellow": (230, 200, 20),
    "black": (0, 0, 0), "orange": (240, 130, 0), "purple": (130, 40, 180), "gray": (128, 128, 128),
    "brown": (120, 70, 20), "pink": (240, 120, 170), "teal": (0, 128, 128), "navy": (10, 20, 90),
}

# name -> (one-line description, SampleConfig overrides); insertion order is the ladder, easiest first.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "learnable": ("one colour, one background, 1-3 large crisp digits: the category is the cue that pays",
                  _LEARNABLE),
    "backgrounds": ("learnable + all 12 background photos (visual clutter, background words)", _BACKGROUNDS),
    "colors": ("backgrounds + the 8-colour palette (the colour word becomes a shortcut cue)", _COLORS),
    "small": ("colors + smaller, bicubic-smoothed digits (0.35-0.6 of the short side)", _SMALL),
    "default": ("SampleConfig() itself: 1-5 digits of 0.2-0.5, 8 colours, 12 backgrounds", {}),
}
# name -> (description, overrides): probes beside the ladder (module docstring), not rungs of it.
PROBES: dict[str, tuple[str, dict[str, Any]]] = {
    "backgrounds_unnamed": ("backgrounds, but no caption or tag names the background (clutter, no word)",
                            {**_BACKGROUNDS, "name_background": False}),
    "flat_named": ("learnable on 12 flat colours that captions name (background word, no clutter)",
                   {**_BACKGROUNDS, "flat_backgrounds": FLAT_BACKGROUNDS}),
}


def preset_names() -> list[str]:
    """The ladder, easiest rung first."""
    return list(PRESETS)


def probe_names() -> list[str]:
    """The probes beside the ladder."""
    return list(PROBES)


def preset_config(name: str) -> SampleConfig:
    """The validated ``SampleConfig`` of preset (rung or probe) ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    presets = {**PRESETS, **PROBES}
    if name not in presets:
        raise ValueError(f"unknown sample preset {name!r}; known: {preset_names() + probe_names()}")
    return SampleConfig(**presets[name][1])
