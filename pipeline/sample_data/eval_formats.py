"""The digit scenes in the four evaluation layouts of ``umg eval`` (docs/evaluation.md), from exact ground truth.

``write_eval_layouts(out_dir)`` reads a finished generation's ``summary.json`` (seed, config, counts),
rebuilds every scene with ``scene_for`` (the pre-JPEG pixels and masks) and adds::

    classification/{split}/{d}/{split}_{d}_{j:04d}.jpg   ImageFolder, one sub-folder per digit 0..9
    classification/{split}/classnames.txt               "zero" ... "nine" (sub-folder sort order)
    classification/{split}/templates.txt                prompts, one a line, "{}" = class name
    annotations/semantic_{split}/{stem}.png             label maps: digit index, 255 = background (ignored)
    annotations/classes.txt                            "zero" ... "nine" (line i = label value i)
    annotations/templates.txt                          the same prompts, for regions / seg
    annotations/panoptic_{split}.json                  COCO panoptic (digits are things, background void)
    annotations/panoptic_{split}/{stem}.png            COCO panoptic PNGs (id = R + 256 G + 256^2 B)

The retrieval and region layouts are the generator's own ``annotations/captions_{split}.json`` and
``annotations/instances_{split}.json`` over ``images/{split}``; the label maps and panoptic PNGs
describe those same images.

Classification images are *single-digit scenes* made for this purpose: whole pictures of one object,
like ImageNet, with the digit at the size range and on the backgrounds of training (a crop around a
digit would be an upscaled close-up the model never saw, and could hold parts of occluding digits).
Scene ``j`` of class ``d`` draws from its own stream ``(seed, split, 0xC1A55, d, j)`` with digit
samples from the split's held pool restricted to class ``d``, so every class gets the same number of
images and val/test use only held-back handwriting. Everything is byte-identical per seed.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.sample_data import coco_writer, templates
from pipeline.sample_data.assets import load_digit_bank
from pipeline.sample_data.config import SPLITS, SampleConfig
from pipeline.sample_data.generate import digit_pools, image_file_name, scene_for
from pipeline.sample_data.scenes import Scene, make_scene

IGNORE = 255
# Prompts written to templates.txt: "{}" is the class name. Both forms are training captions of every digit
# (image and region), and neither needs an article fix ("a photo of a {}" would give "a photo of a eight").
EVAL_TEMPLATES: tuple[str, ...] = ("{}", "a handwritten {}")
_CLASSIFY_STREAM = 0xC1A55


def semantic_label_map(scene: Scene) -> np.ndarray:
    """(H, W) uint8: the digit of each visible digit pixel, ``IGNORE`` (255) on background."""
    label_map = np.full((scene.height, scene.width), IGNORE, dtype=np.uint8)
    for placement, mask in zip(scene.placements, scene.visible_masks, strict=True):
        label_map[mask] = placement.digit
    return label_map


def id_to_rgb(seg: np.ndarray) -> np.ndarray:
    """(H, W) int segment ids -> (H, W, 3) uint8, COCO panoptic's ``id = R + 256 G + 256^2 B``."""
    seg = seg.astype(np.int64)
    return np.stack([seg % 256, seg // 256 % 256, seg // 65536 % 256], axis=-1).astype(np.uint8)


def panoptic_segments(scene: Scene) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """A scene as a COCO panoptic pair: (H, W) int64 segment ids (0 = void: the background photo) and
    ``segments_info`` (segment ``k`` + 1 is the ``k``-th digit in paste order, category ``digit + 1``)."""
    seg = np.zeros((scene.height, scene.width), dtype=np.int64)
    segments = []
    for k, (placement, mask) in enumerate(zip(scene.placements, scene.visible_masks, strict=True)):
        seg[mask] = k + 1
        segments.append({"id": k + 1, "category_id": placement.digit + 1, "iscrowd": 0,
                         "bbox": coco_writer.mask_bbox_xywh(mask), "area": int(mask.sum())})
    return seg, segments


def panoptic_categories(config: SampleConfig) -> list[dict[str, Any]]:
    """The digit categories (ids as in the instances JSON), all things, coloured for viewers."""
    colors = list(config.palette.values())
    return [{**c, "isthing": 1, "color": list(colors[i % len(colors)])} for i, c in enumerate(coco_writer.categories())]


def _write_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, format="PNG", optimize=False)


def _write_lines(path: Path, lines: list[str] | tuple[str, ...]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def _write_dense_split(out_dir: Path, split: str, count: int, seed: int, cfg: SampleConfig) -> int:
    """Label maps + panoptic PNGs/JSON of the split's scenes; returns the number of digit segments."""
    annotations = out_dir / "annotations"
    semantic_dir, panoptic_dir = annotations / f"semantic_{split}", annotations / f"panoptic_{split}"
    for folder in (semantic_dir, panoptic_dir):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    images, entries = [], []
    for index in range(count):
        scene = scene_for(seed, split, index, cfg)
        stem = Path(image_file_name(split, index)).stem
        _write_png(semantic_dir / f"{stem}.png", semantic_label_map(scene))
        seg, segments = panoptic_segments(scene)
        _write_png(panoptic_dir / f"{stem}.png", id_to_rgb(seg))
        images.append({"id": index + 1, "file_name": f"{stem}.jpg", "width": scene.width, "height": scene.height})
        entries.append({"image_id": index + 1, "file_name": f"{stem}.png", "segments_info": segments})
    document = {"info": coco_writer.INFO, "licenses": [], "images": images, "annotations": entries,
                "categories": panoptic_categories(cfg)}
    coco_writer.write_json(annotations / f"panoptic_{split}.json", document)
    return sum(len(e["segments_info"]) for e in entries)


def classification_scene(seed: int, split: str, digit: int, index: int, config: SampleConfig) -> Scene:
    """Single-digit scene ``index`` of class ``digit`` (pre-JPEG), drawn from the split's held pool."""
    pool = digit_pools(seed, config)[split]
    bank = load_digit_bank()
    class_pool = pool[bank.labels[pool] == digit]
    if len(class_pool) == 0:
        raise ValueError(f"split {split!r} holds no sample of digit {digit}; raise split_fractions[{split!r}]")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [seed, SPLITS.index(split), _CLASSIFY_STREAM, digit, index])))
    single = config.model_copy(update={"digits_per_image": (1, 1)})
    return make_scene(rng, single, bank, class_pool)


def _write_classification_split(out_dir: Path, split: str, per_class: int, seed: int, cfg: SampleConfig) -> None:
    root = out_dir / "classification" / split
    shutil.rmtree(root, ignore_errors=True)
    for digit in range(len(templates.DIGIT_WORDS)):
        folder = root / str(digit)
        folder.mkdir(parents=True)
        for j in range(per_class):
            scene = classification_scene(seed, split, digit, j, cfg)
            jpeg = coco_writer.encode_jpeg(scene.image, cfg.jpeg_quality)
            (folder / f"{split}_{digit}_{j:04d}.jpg").write_bytes(jpeg)
    _write_lines(root / "classnames.txt", templates.DIGIT_WORDS)
    _write_lines(root / "templates.txt", EVAL_TEMPLATES)


def write_eval_layouts(out_dir: str | Path, per_class: int | None = None) -> dict[str, dict[str, int]]:
    """Add the evaluation layouts (module docstring) to a finished ``generate_sample`` directory.

    Args:
        out_dir: a directory holding ``summary.json`` from ``generate_sample``; earlier eval layouts
            there are replaced.
        per_class: classification images per digit and split; default ``ceil(split images / 10)``
            (at least 1), so each split's ImageFolder is about as large as the split.
    Returns:
        ``{split: {"images", "segments", "classification_images"}}`` for the splits with images.
    """
    out_dir = Path(out_dir)
    summary_path = out_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path} not found: run generate_sample (umg sample) into {out_dir} first")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    seed, cfg = int(summary["seed"]), SampleConfig.model_validate(summary["config"])
    if per_class is not None and per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    annotations = out_dir / "annotations"
    _write_lines(annotations / "classes.txt", templates.DIGIT_WORDS)
    _write_lines(annotations / "templates.txt", EVAL_TEMPLATES)
    counts = {}
    for split in SPLITS:
        count = int(summary["splits"][split]["images"])
        if count == 0:
            continue
        k = per_class or max(1, math.ceil(count / len(templates.DIGIT_WORDS)))
        segments = _write_dense_split(out_dir, split, count, seed, cfg)
        _write_classification_split(out_dir, split, k, seed, cfg)
        counts[split] = {"images": count, "segments": segments, "classification_images": k * len(templates.DIGIT_WORDS)}
    return counts
