"""``SampleConfig``: every knob of the digit-scenes generator, validated (DESIGN.md "Sample data")."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SPLITS: tuple[str, ...] = ("train", "val", "test")

# skimage.data photos that ship inside the scikit-image wheel (no pooch download): label -> loader name.
# The label is the background word used in tags and captions ("a three on a coffee background").
BACKGROUND_LOADERS: dict[str, str] = {
    "astronaut": "astronaut",
    "brick": "brick",
    "camera": "camera",
    "cat": "chelsea",
    "clock": "clock",
    "coffee": "coffee",
    "coins": "coins",
    "grass": "grass",
    "gravel": "gravel",
    "moon": "moon",
    "page": "page",
    "rocket": "rocket",
}

# Named colours a digit is painted with; the name is the colour word in tags and captions.
DEFAULT_PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (25, 175, 50),
    "blue": (30, 70, 235),
    "yellow": (250, 220, 20),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "orange": (255, 135, 0),
    "purple": (145, 40, 200),
}

Channel = Annotated[int, Field(ge=0, le=255)]


def _check_range(name: str, lo: float, hi: float) -> None:
    if lo > hi:
        raise ValueError(f"{name}: lower bound {lo} > upper bound {hi}")


class SampleConfig(BaseModel):
    """Sizes, counts, colours and splits of the generated digit scenes.

    Ranges are inclusive ``(low, high)`` pairs. Digit heights are fractions of the image's shorter
    side, so with the defaults a digit is 38-160 px tall (2-10 patches of 16 px).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_side: tuple[Annotated[int, Field(ge=32, le=4096)], Annotated[int, Field(ge=32, le=4096)]] = Field(
        default=(192, 320), description="width and height are each drawn uniformly from this px range"
    )
    digits_per_image: tuple[Annotated[int, Field(ge=1, le=10)], Annotated[int, Field(ge=1, le=10)]] = (1, 5)
    digit_height_frac: tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]] = Field(
        default=(0.2, 0.5), description="digit height as a fraction of the image's shorter side"
    )
    digit_aspect_jitter: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = Field(
        default=(0.85, 1.15), description="multiplies the digit's natural width/height ratio"
    )
    upsample: Literal["nearest", "bilinear", "bicubic"] = Field(
        default="bicubic", description="how the 8x8 digit is upscaled before thresholding"
    )
    mask_threshold: float = Field(
        default=0.4, gt=0, lt=1, description="upscaled intensity (0-1) at or above which a pixel is digit"
    )
    palette: dict[str, tuple[Channel, Channel, Channel]] = Field(default_factory=lambda: dict(DEFAULT_PALETTE))
    backgrounds: tuple[str, ...] = Field(default=tuple(BACKGROUND_LOADERS))
    flat_backgrounds: dict[str, tuple[Channel, Channel, Channel]] = Field(
        default_factory=dict,
        description="if not empty: each scene gets a flat fill of one of these colours (the key is its background "
                    "word) instead of a photo of `backgrounds` — background words without texture clutter",
    )
    name_background: bool = Field(
        default=True,
        description="captions and tags name the background; false drops every caption template with "
                    "{background} and the background tag — background clutter without the word",
    )
    crop_frac: tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]] = Field(
        default=(0.35, 1.0), description="background crop side as a fraction of the largest crop of that aspect"
    )
    occlusion_prob: float = Field(
        default=0.3, ge=0, le=1, description="chance that a digit is placed over an earlier one"
    )
    min_visible_frac: float = Field(
        default=0.3, gt=0, le=1, description="an occluded digit keeps at least this share of its pixels"
    )
    placement_tries: int = Field(default=25, ge=1, description="positions tried per digit before it is skipped")
    split_fractions: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1},
        description="share of images per split; load_digits samples are split by the same shares",
    )
    jpeg_quality: int = Field(default=92, ge=1, le=100)

    @field_validator("palette", "flat_backgrounds")
    @classmethod
    def _palette_words(cls, palette: dict[str, tuple[int, int, int]], info) -> dict[str, tuple[int, int, int]]:
        if not palette and info.field_name == "palette":
            raise ValueError("palette needs at least one colour")
        for name in palette:
            if not name.isalpha() or not name.islower():
                raise ValueError(f"colour name {name!r} must be one lower-case word (it is a tag)")
        return palette

    @field_validator("backgrounds")
    @classmethod
    def _known_backgrounds(cls, backgrounds: tuple[str, ...]) -> tuple[str, ...]:
        if not backgrounds:
            raise ValueError("backgrounds needs at least one photo")
        unknown = sorted(set(backgrounds) - set(BACKGROUND_LOADERS))
        if unknown:
            raise ValueError(f"unknown backgrounds {unknown}; choose from {sorted(BACKGROUND_LOADERS)}")
        return backgrounds

    @field_validator("split_fractions")
    @classmethod
    def _fractions_sum_to_one(cls, fractions: dict[str, float]) -> dict[str, float]:
        if set(fractions) != set(SPLITS):
            raise ValueError(f"split_fractions needs exactly the keys {list(SPLITS)}, got {sorted(fractions)}")
        if not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
            raise ValueError(f"split_fractions must sum to 1, got {sum(fractions.values())}")
        return {split: fractions[split] for split in SPLITS}

    @model_validator(mode="after")
    def _ranges_ordered(self) -> SampleConfig:
        _check_range("image_side", *self.image_side)
        _check_range("digits_per_image", *self.digits_per_image)
        _check_range("digit_height_frac", *self.digit_height_frac)
        _check_range("digit_aspect_jitter", *self.digit_aspect_jitter)
        _check_range("crop_frac", *self.crop_frac)
        return self
