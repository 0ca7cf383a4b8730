"""``generate_sample``: write a deterministic digit-scenes dataset as COCO JSON + JPEGs.

Layout under ``out_dir`` (read by the digit-scenes source reader)::

    images/{split}/{split}_{i:06d}.jpg     i counts within the split, from 0
    annotations/instances_{split}.json    COCO instances + "umg" extension
    annotations/captions_{split}.json     COCO captions
    summary.json                          counts per split, config, seed (written last)

Scene ``i`` of a split draws from its own ``PCG64`` stream seeded by ``(seed, split, i)``, so it does
not depend on ``n`` or on other scenes; val/test scenes use only held-back ``load_digits`` samples.
"""

from __future__ import annotations

import functools
import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipeline.sample_data import coco_writer
from pipeline.sample_data.assets import load_digit_bank, split_counts, split_digit_samples
from pipeline.sample_data.config import SPLITS, SampleConfig
from pipeline.sample_data.scenes import Scene, make_scene

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "1"


class SplitSummary(BaseModel):
    """What one split holds; ``digit_samples_used`` are sorted distinct ``load_digits`` indices."""

    model_config = ConfigDict(extra="forbid")

    images: int
    annotations: int
    digit_pool_size: int
    digit_samples_used: list[int]
    digits_per_class: list[int] = Field(description="instances of digit 0..9")
    backgrounds: dict[str, int]


class SampleSummary(BaseModel):
    """Returned by ``generate_sample`` and written as ``summary.json`` (no paths, no timestamps)."""

    model_config = ConfigDict(extra="forbid")

    generator_version: str = GENERATOR_VERSION
    seed: int
    n: int
    config: SampleConfig
    splits: dict[str, SplitSummary]


def image_file_name(split: str, index: int) -> str:
    """``("train", 3) -> "train_000003.jpg"`` (relative to ``images/{split}``)."""
    return f"{split}_{index:06d}.jpg"


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The independent random stream of scene ``index`` of ``split``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, SPLITS.index(split), index])))


@functools.lru_cache(maxsize=8)
def _digit_pools(seed: int, fractions: tuple[tuple[str, float], ...]) -> dict[str, np.ndarray]:
    return split_digit_samples(load_digit_bank().labels, dict(fractions), seed)


def digit_pools(seed: int, config: SampleConfig) -> dict[str, np.ndarray]:
    """Disjoint per-split ``load_digits`` index pools (see ``assets.split_digit_samples``)."""
    return _digit_pools(seed, tuple(config.split_fractions.items()))


def scene_for(seed: int, split: str, index: int, config: SampleConfig | None = None) -> Scene:
    """Rebuild scene ``index`` of ``split`` exactly as ``generate_sample`` made it (pre-JPEG pixels)."""
    cfg = config or SampleConfig()
    pool = digit_pools(seed, cfg)[split]
    if len(pool) == 0:
        raise ValueError(f"split {split!r} has no held digit samples; raise split_fractions[{split!r}]")
    return make_scene(scene_rng(seed, split, index), cfg, load_digit_bank(), pool)


def _prepare_out_dir(out_dir: Path) -> None:
    """Create the layout and delete an earlier generation's files (only names this generator writes)."""
    (out_dir / "summary.json").unlink(missing_ok=True)  # removed first: its absence marks an unfinished write
    for split in SPLITS:
        image_dir = out_dir / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        for path in image_dir.glob(f"{split}_*.jpg"):
            if re.fullmatch(rf"{split}_\d{{6}}\.jpg", path.name):
                path.unlink()
        for kind in ("instances", "captions"):
            (out_dir / "annotations" / f"{kind}_{split}.json").unlink(missing_ok=True)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)


def _write_split(out_dir: Path, split: str, count: int, seed: int, cfg: SampleConfig) -> SplitSummary:
    pool = digit_pools(seed, cfg)[split]
    images, annotations = [], []
    used: set[int] = set()
    per_class = [0] * 10
    backgrounds: Counter[str] = Counter()
    for index in range(count):
        scene = scene_for(seed, split, index, cfg)
        file_name = image_file_name(split, index)
        (out_dir / "images" / split / file_name).write_bytes(coco_writer.encode_jpeg(scene.image, cfg.jpeg_quality))
        images.append(coco_writer.scene_image_entry(index + 1, file_name, scene))
        annotations += coco_writer.scene_annotations(index + 1, len(annotations) + 1, scene)
        used.update(p.sample for p in scene.placements)
        for placement in scene.placements:
            per_class[placement.digit] += 1
        backgrounds[scene.background] += 1
    annotation_dir = out_dir / "annotations"
    coco_writer.write_json(annotation_dir / f"instances_{split}.json", coco_writer.instances_json(images, annotations))
    coco_writer.write_json(annotation_dir / f"captions_{split}.json", coco_writer.captions_json(images))
    logger.info("sample data %s: %d images, %d digits", split, count, len(annotations))
    return SplitSummary(
        images=count,
        annotations=len(annotations),
        digit_pool_size=len(pool),
        digit_samples_used=sorted(used),
        digits_per_class=per_class,
        backgrounds=dict(sorted(backgrounds.items())),
    )


def generate_sample(out_dir: Path, n: int, seed: int, config: SampleConfig | None = None) -> SampleSummary:
    """Generate ``n`` digit scenes split train/val/test by ``config.split_fractions``.

    Args:
        out_dir: output root (created). An earlier generation there is replaced: files with the names this
            generator writes are deleted first, other files are left alone.
        n: total number of images (>= 0), split by the largest-remainder rule.
        seed: fixes every byte of the output.
        config: sizes, counts, colours, splits; defaults to ``SampleConfig()``.
    Returns:
        the summary also written to ``out_dir/summary.json``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    cfg = config or SampleConfig()
    out_dir = Path(out_dir)
    counts = dict(zip(SPLITS, split_counts(n, [cfg.split_fractions[s] for s in SPLITS]), strict=True))
    pools = digit_pools(seed, cfg)
    for split, count in counts.items():
        if count and len(pools[split]) == 0:
            raise ValueError(f"split {split!r} gets {count} images but no held digit samples")
    _prepare_out_dir(out_dir)
    splits = {split: _write_split(out_dir, split, count, seed, cfg) for split, count in counts.items()}
    summary = SampleSummary(seed=seed, n=n, config=cfg, splits=splits)
    coco_writer.write_json(out_dir / "summary.json", summary.model_dump(mode="json"))
    logger.info("sample data written to %s: %s", out_dir, {s: c for s, c in counts.items()})
    return summary
