"""Semantic segmentation (mIoU) and panoptic quality of a model on label-map data (``umg eval seg``).

Data layout (docs/evaluation.md): ``--images DIR`` with the pictures, ``--masks DIR`` with one PNG label
map per image of the same stem (pixel value = line index in ``--classes``, 255 = ignore), optionally a
COCO panoptic JSON whose PNGs (``id = R + 256 G + 256^2 B``, 0 = VOID) lie in the folder of the JSON's
name (COCO's ``panoptic_val2017.json`` + ``panoptic_val2017/``) or ``panoptic_masks``; its categories are
matched to ``--classes`` by name.

The model: ``model`` itself when it has ``segment_semantic`` (an adapted dense model, ``model.adapted``),
else :class:`model.eval.segmenter.TrainingFreeSegmenter` on it (``dense_features``: final tokens or MaskCLIP's
value path). Text embeddings are the prompt-ensembled class names through ``model.umg`` (or the model), a
name split into synonyms at commas and scored by the best one (FC-CLIP); default prompts: FC-CLIP's ViLD
templates for an adapted model, ``DEFAULT_TEMPLATES`` for the training-free probe. Inputs: the model's
preprocess (squashed to S x S), or with ``short_side`` detectron2's test geometry (shorter side N, aspect
kept, zero-padded; the padding is cropped off the predictions). Predictions are mapped back to each label map's size — class probabilities bilinearly (then argmax),
panoptic segment ids by nearest neighbour, instance mask logits bilinearly (then > 0) — and scored there
(``model.eval.seg_metrics``; mask AP: ``model.eval.mask_ap``, when the model outputs instances).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from model.eval.datasets import EvalDataError, open_image
from model.eval.features import Progress
from model.dense.vocabulary import VILD_TEMPLATES, synonym_text_embeddings
from model.eval.mask_ap import MaskAP
from model.eval.prompts import DEFAULT_TEMPLATES
from model.eval.region_eval import default_templates
from model.eval.report import TABLE_COLUMNS, make_result
from model.eval.seg_metrics import IGNORE_INDEX, PanopticQuality, SemanticConfusion
from model.eval.segmenter import TrainingFreeSegmenter
from model.loading import create_model_and_transforms
from model.preprocess import patch_size, short_side_transform
from pipeline.storage import as_path

TASK = "semantic_segmentation"
TABLE_COLUMNS[TASK] = [("miou", "mIoU"), ("fwiou", "fwIoU"), ("pixel_acc", "pixel acc"), ("macc", "mean class acc"),
                        ("pq", "PQ"), ("sq", "SQ"), ("rq", "RQ"), ("mask_ap", "mask AP"), ("mask_ap50", "mask AP50"),
                        *((f"{m}_{g}", f"{m.upper()} {g}") for g in ("th", "st") for m in ("pq", "sq", "rq"))]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 COCO panoptic PNG -> (H, W) int64 segment ids (``R + 256 G + 256^2 B``)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def read_classes(path: str | Path, ignore_index: int = IGNORE_INDEX) -> list[str]:
    """Class names, one a line (line i = label value i); blank lines are an error (they shift indices), and
    so is a class whose index would be the ignore value."""
    if not as_path(path).is_file():
        raise FileNotFoundError(f"classes {path}: no such file")
    lines = as_path(path).read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if not lines or blank:
        raise EvalDataError(f"{path}: need one class name per line, no blank lines (blank: {blank[:5]})")
    if len(lines) > ignore_index:
        raise EvalDataError(f"{path}: {len(lines)} classes, but label value {ignore_index} means ignore; use 16-bit "
                            "label maps with another ignore value (--ignore-index 65535)")
    return [line.strip() for line in lines]


def pair_images_and_masks(images_dir: str | Path, masks_dir: str | Path) -> list[tuple[Path, Path]]:
    """``(image, label map)`` pairs by file stem, in label-map name order; every label map needs its image."""
    images_dir, masks_dir = as_path(images_dir), as_path(masks_dir)
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such directory")
    images = {p.stem: p for p in sorted(images_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    masks = sorted(masks_dir.glob("*.png"))
    if not masks:
        raise EvalDataError(f"{masks_dir}: no .png label maps")
    missing = [m.name for m in masks if m.stem not in images]
    if missing:
        raise EvalDataError(f"{images_dir}: no image for label maps {missing[:5]} ({len(missing)} in all)")
    return [(images[m.stem], m) for m in masks]


def load_panoptic(path: str | Path, classnames: Sequence[str], png_dir: str | Path | None = None
                  ) -> tuple[dict[str, tuple[Path, list[dict]]], dict[int, bool]]:
    """A COCO panoptic JSON as ``{image stem: (png, segments with category_id = class index)}`` and
    ``{class index: isthing}`` for its categories (matched to ``classnames`` by name)."""
    path = as_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"panoptic {path}: no such file")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EvalDataError(f"{path}: not JSON ({exc})") from exc
    missing = [k for k in ("images", "annotations", "categories") if k not in document]
    if missing:
        raise EvalDataError(f"{path}: not a COCO panoptic file, no {missing} lists")
    png_dir = as_path(png_dir) if png_dir is not None else path.with_suffix("")
    if not png_dir.is_dir():
        raise FileNotFoundError(f"panoptic PNG folder {png_dir} not found (pass --panoptic-masks)")
    index = {name: i for i, name in enumerate(classnames)}
    unknown = [c["name"] for c in document["categories"] if c["name"] not in index]
    if unknown:
        raise EvalDataError(f"{path}: categories {unknown[:5]} are not in the class list")
    category_to_class = {c["id"]: index[c["name"]] for c in document["categories"]}
    isthing = {category_to_class[c["id"]]: bool(c.get("isthing", 1)) for c in document["categories"]}
    image_stem = {i["id"]: Path(i["file_name"]).stem for i in document["images"]}
    entries = {}
    for ann in document["annotations"]:
        segments = [{**s, "category_id": category_to_class[s["category_id"]]} for s in ann["segments_info"]]
        entries[image_stem[ann["image_id"]]] = (png_dir / ann["file_name"], segments)
    return entries, isthing


def _label_map(path: Path) -> np.ndarray:
    with open_image(path) as image:
        if image.mode not in ("L", "P", "I;16", "I"):
            raise EvalDataError(f"label map {path} has mode {image.mode}: need one channel of class indices")
        return np.array(image).astype(np.int64)


def drop_zero_label(label_map: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """mmseg's ``reduce_zero_label``: value 0 ("other" / background) -> ignore, every other class v -> v - 1,
    ignore stays ignore. Reads ADE20K's raw 0..150 maps as A-150 and VOC's 0..20 maps as PAS-20."""
    return np.where((label_map == 0) | (label_map == ignore_index), ignore_index, label_map - 1)


def _resize(tensor: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """(C, S, S) -> (C, H, W) with ``mode`` (bilinear for scores, nearest for ids)."""
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(tensor[None].float(), size=size, mode=mode, **kwargs)[0]


def upsampled_argmax(probs: torch.Tensor, size: tuple[int, int], chunk: int = 64) -> torch.Tensor:
    """Argmax over classes of (C, S, S) scores upsampled bilinearly to ``size`` (H, W) -> (H, W) int64,
    ``chunk`` classes at a time (A-847 at ADE resolution would otherwise need ~1 GB per image)."""
    best_val = best_idx = None
    for start in range(0, probs.shape[0], chunk):
        val, idx = _resize(probs[start:start + chunk], size, "bilinear").max(dim=0)
        if best_val is None:
            best_val, best_idx = val, idx
            continue
        better = val > best_val  # strict: the lower class index wins ties, as in one argmax
        best_val = torch.where(better, val, best_val)
        best_idx = torch.where(better, idx + start, best_idx)
    return best_idx


def _load_batch(batch: Sequence[tuple[Path, Path]], preprocess: Callable
                ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Images of ``batch`` through ``preprocess`` -> (B, 3, H, W) and each image's (h, w) inside it (the
    whole input, or the unpadded part for :func:`model.preprocess.short_side_transform`)."""
    tensors, valid = [], []
    for image_path, _ in batch:
        with open_image(image_path) as image:
            out = preprocess(image.convert("RGB"))
        tensor, hw = out if isinstance(out, tuple) else (out, tuple(out.shape[-2:]))
        tensors.append(tensor)
        valid.append(hw)
    return torch.stack(tensors), valid


def _finite(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module,
    preprocess: Callable[[Image.Image], torch.Tensor],
    tokenizer: Callable,
    images: str | Path,
    masks: str | Path,
    classes: str | Path,
    *,
    templates: Sequence[str] | None = None,
    panoptic: str | Path | None = None,
    panoptic_masks: str | Path | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduce_zero_label: bool = False,
    miou_convention: str = "detectron2",
    dense_features: str = "tokens",
    short_side: int | None = None,
    max_side: int = 1333,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    limit: int | None = None,
    progress: Progress | None = None,
) -> tuple[dict[str, float], dict]:
    """Run the protocol of the module docstring on a loaded model.

    Returns:
        ``(metrics, info)``: metrics ``miou, fwiou, pixel_acc, macc`` and with ``panoptic`` ``pq, sq, rq``
        (all categories), ``pq_th, sq_th, rq_th`` / ``pq_st, sq_st, rq_st`` (things / stuff, where present)
        and, for a model with ``segment_instances``, ``mask_ap, mask_ap50`` over the thing classes; info holds ``mode`` ("adapted" or "training-free"), counts, ``iou_per_class`` {name: IoU or None}
        and the templates.
    """
    classnames = read_classes(classes, ignore_index)
    pairs = pair_images_and_masks(images, masks)[:limit]
    umg = getattr(model, "umg", model)
    adapted = hasattr(model, "segment_semantic")
    segmenter = model if adapted else TrainingFreeSegmenter(model, dense_features=dense_features)
    if templates is None:
        templates = VILD_TEMPLATES if adapted else DEFAULT_TEMPLATES
    text_emb = synonym_text_embeddings(umg, tokenizer, classnames, templates).to(device)
    panoptic_gt, isthing = load_panoptic(panoptic, classnames, panoptic_masks) if panoptic else ({}, {})
    thing_mask = torch.tensor([isthing.get(i, False) for i in range(len(classnames))], device=device)

    if short_side is not None:  # detectron2's test geometry, one image at a time (sizes differ)
        preprocess = short_side_transform(model, short_side, max_side, 2 * max(patch_size(model)))
        batch_size = 1
    confusion, pq = SemanticConfusion(len(classnames), ignore_index, miou_convention), PanopticQuality()
    mask_ap = MaskAP(isthing) if panoptic and hasattr(segmenter, "segment_instances") else None
    panoptic_images = 0
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        batch_images, valid = _load_batch(batch, preprocess)
        batch_images = batch_images.to(device)
        probs = [p[:, :h, :w] for p, (h, w) in zip(segmenter.segment_semantic(batch_images, text_emb), valid,
                                                    strict=True)]
        for (_, mask_path), image_probs in zip(batch, probs, strict=True):
            target = _label_map(mask_path)
            if reduce_zero_label:
                target = drop_zero_label(target, ignore_index)
            pred = upsampled_argmax(image_probs, target.shape)
            try:
                confusion.update(pred.cpu(), torch.from_numpy(target))
            except ValueError as exc:
                raise EvalDataError(f"label map {mask_path}: {exc}") from exc
        with_gt = [i for i, (image_path, _) in enumerate(batch) if image_path.stem in panoptic_gt]
        if with_gt:
            outputs = segmenter.segment_panoptic(batch_images[with_gt], text_emb, thing_mask)
            if mask_ap is not None:
                instances = dict(zip(with_gt, segmenter.segment_instances(batch_images[with_gt], text_emb, thing_mask),
                                     strict=True))
            for i, (seg, segments) in zip(with_gt, outputs, strict=True):
                png, gt_segments = panoptic_gt[batch[i][0].stem]
                with open_image(png) as image:
                    gt_seg = rgb_to_id(np.array(image.convert("RGB")))
                h, w = valid[i]
                pred_seg = _resize(seg[None, :h, :w], gt_seg.shape, "nearest")[0].long().cpu().numpy()
                pq.update(pred_seg, segments, gt_seg, gt_segments)
                panoptic_images += 1
                if mask_ap is not None:
                    logits, scores, labels = instances[i]
                    mask_ap.update(gt_seg, gt_segments, logits[:, :h, :w], scores, labels)
        if progress is not None:
            progress(start + len(batch), len(pairs))
    if panoptic and panoptic_images == 0:
        raise EvalDataError(f"{panoptic}: no evaluated image has an entry")

    scores = confusion.compute()
    metrics = {k: scores[k] for k in ("miou", "fwiou", "pixel_acc", "macc")}
    if panoptic:
        metrics.update(pq.compute(isthing))
    if mask_ap is not None:
        metrics.update(mask_ap.compute())
    iou = {name: (None if math.isnan(v) else v) for name, v in zip(classnames, scores["iou_per_class"], strict=True)}
    info = {"mode": "adapted" if adapted else "training-free", "n_images": len(pairs),
            "input": f"short side {short_side}, max {max_side}" if short_side else "squashed",
            "n_panoptic_images": panoptic_images, "n_classes": len(classnames), "iou_per_class": iou,
            "miou_convention": miou_convention, **({} if adapted else {"dense_features": dense_features}),
            "templates": list(templates)}
    return _finite(metrics), info


def run_seg(checkpoint: str, images: str | Path, masks: str | Path, classes: str | Path, *,
            templates_file: Path | None = None, device: str = "cpu", cluster_in_eval: bool = False,
            **kwargs) -> dict:
    """Load ``checkpoint`` (any form ``create_model_and_transforms`` takes, adapted dense models included)
    and evaluate it; the result dict. Templates: ``templates_file``, else ``templates.txt`` beside the
    classes file, else the built-in ones."""
    templates = default_templates(as_path(classes), templates_file)
    model, preprocess, tokenizer = create_model_and_transforms(checkpoint, device=device,
                                                               cluster_in_eval=cluster_in_eval)
    metrics, info = evaluate_segmentation(model, preprocess, tokenizer, images, masks, classes,
                                          templates=templates, device=device, **kwargs)
    return make_result(TASK, as_path(masks).name, str(checkpoint), metrics, **info)
