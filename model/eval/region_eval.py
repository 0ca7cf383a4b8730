"""Zero-shot region classification from ground-truth boxes (``umg eval regions``).

Protocol (RegionCLIP, Zhong et al. 2022, "zero-shot inference with ground-truth boxes"; FG-CLIP's
box-level classification): the detector is taken out of the loop, so the number measures region-text
alignment alone.

1. Each image goes through the one inference preprocess (``model.preprocess.eval_transform``: the whole
   image squashed to S x S); its COCO boxes are mapped by the same per-axis scale
   (``scale_boxes_to_input``).
2. ``encode_image`` gives the full (unclustered) token grid; ``encode_regions`` RoIAligns every box on it
   and applies the image path's projection — the model's own region path of training.
3. Region embeddings are compared by cosine with prompt-ensembled category-name embeddings
   (``model.eval.prompts.class_text_embeddings``) and turned into probabilities with the model's
   own temperature: ``softmax(logit_scale * cos)`` over the categories.
4. Metrics: ``acc1`` / ``acc5`` (top-k over boxes), ``mean_per_class_recall`` (balanced accuracy over the
   categories that have boxes), and box AP with pycocotools ``COCOeval(iouType="bbox")`` where every GT
   box is submitted once per category (or per top-k category) as a detection with score = that
   category's probability. Since the boxes are exact, AP measures only how well the scores rank the
   right category's boxes above other boxes — per category and across images, which top-1 does not.
   ``box_ap`` is AP@[.50:.95] (equal to AP50 unless same-category GT boxes overlap), ``box_ap50`` AP@.50.

Crowd boxes (``iscrowd=1``) are not classified (COCOeval ignores matches to them anyway).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from model.eval.datasets import EvalDataError, open_image, read_lines
from model.eval.features import Progress
from model.eval.metrics import classification_metrics
from model.eval.prompts import DEFAULT_TEMPLATES, class_text_embeddings
from model.eval.report import TABLE_COLUMNS, make_result
from model.loading import create_model_and_transforms
from model.preprocess import scale_boxes_to_input
from pipeline.storage import as_path

TASK = "zeroshot_region_classification"
TEMPLATES_FILE = "templates.txt"
TABLE_COLUMNS[TASK] = [("acc1", "top-1"), ("acc5", "top-5"), ("mean_per_class_recall", "mean per-class"),
                        ("box_ap", "box AP"), ("box_ap50", "box AP50")]


def load_coco(annotations: str | Path):
    """A pycocotools ``COCO`` for an instances JSON (quietly; missing ``area`` filled with w * h)."""
    from pycocotools.coco import COCO

    path = as_path(annotations)
    if not path.is_file():
        raise FileNotFoundError(f"annotations {path}: no such file")
    try:
        dataset = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EvalDataError(f"{path}: not JSON ({exc})") from exc
    for key in ("images", "annotations", "categories"):
        if key not in dataset:
            raise EvalDataError(f"{path}: not a COCO instances file, no {key!r} list")
    for ann in dataset["annotations"]:
        if "bbox" not in ann:
            raise EvalDataError(f"{path}: annotation {ann.get('id')} has no bbox")
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        ann.setdefault("iscrowd", 0)
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 4) COCO ``[x, y, w, h]`` -> (N, 4) ``[x1, y1, x2, y2]``."""
    return torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)


def _logit_scale(umg: nn.Module) -> float:
    return float(umg.logit_scale_exp()) if hasattr(umg, "logit_scale_exp") else 100.0


@torch.no_grad()
def region_probabilities(umg: nn.Module, images: torch.Tensor, boxes: Sequence[torch.Tensor],
                         text_emb: torch.Tensor) -> torch.Tensor:
    """Class probabilities of boxes through the model's region path.

    Args:
        umg: a ``UMGCLIP`` (``encode_image``, ``encode_regions``, ``logit_scale_exp``).
        images: (B, 3, S, S) preprocessed images.
        boxes: B tensors (N_i, 4) xyxy in input pixels.
        text_emb: (C, E) normalised class embeddings.

    Returns:
        (sum N_i, C) softmax probabilities, boxes in input order.
    """
    _, grid = umg.encode_image(images)
    region_emb = umg.encode_regions(grid, list(boxes), tuple(images.shape[-2:]))
    logits = _logit_scale(umg) * region_emb.float() @ text_emb.float().T
    return logits.softmax(dim=-1)


def read_templates(path: Path) -> list[str]:
    """Prompt templates, one a line, each with ``{}`` for the class name."""
    templates = read_lines(path)
    if not templates or any("{}" not in t for t in templates):
        raise EvalDataError(f"{path}: every line needs '{{}}' for the class name")
    return templates


def default_templates(data_file: Path, templates_file: Path | None) -> list[str] | None:
    """``templates_file``, else ``templates.txt`` beside ``data_file`` if there is one, else None (built-in)."""
    if templates_file is not None:
        if not as_path(templates_file).is_file():
            raise FileNotFoundError(f"templates {templates_file}: no such file")
        return read_templates(as_path(templates_file))
    beside = as_path(data_file).parent / TEMPLATES_FILE
    return read_templates(beside) if beside.is_file() else None


def coco_box_ap(coco, detections: list[dict], iou_type: str = "bbox") -> tuple[float, float]:
    """COCOeval AP@[.5:.95] and AP@.5 of ``detections`` against ``coco`` (quietly); ``iou_type`` "bbox" or
    "segm" (detections then carry RLE ``segmentation``)."""
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        results = coco.loadRes(detections)
        evaluator = COCOeval(coco, results, iouType=iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return max(float(evaluator.stats[0]), 0.0), max(float(evaluator.stats[1]), 0.0)


def _field(annotation: dict, dotted: str):
    value = annotation
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def attribute_view(coco, field: str):
    """The same boxes with an attribute as the category: categories become the distinct string values of
    the annotation field ``field`` (dotted path, e.g. ``"umg.color"``), sorted by name (ids from 1)."""
    from pycocotools.coco import COCO

    data = coco.dataset
    boxes = [a for a in data["annotations"] if not a.get("iscrowd", 0)]
    values = [_field(a, field) for a in boxes]
    missing = [a.get("id") for a, v in zip(boxes, values, strict=True) if not isinstance(v, str)]
    if missing:
        raise EvalDataError(f"attribute {field!r}: annotations {missing[:5]} have no string value for it")
    names = sorted(set(values))
    category_of = {name: i + 1 for i, name in enumerate(names)}
    view = COCO()
    view.dataset = {**data, "categories": [{"id": category_of[n], "name": n} for n in names],
                    "annotations": [{**a, "category_id": category_of[v]} for a, v in zip(boxes, values, strict=True)]}
    with contextlib.redirect_stdout(io.StringIO()):
        view.createIndex()
    return view


def evaluate_regions(
    model: nn.Module,
    preprocess: Callable[[Image.Image], torch.Tensor],
    tokenizer: Callable,
    images: str | Path,
    annotations: str | Path,
    *,
    templates: Sequence[str] | None = None,
    topk: int | None = None,
    attribute: str | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    limit: int | None = None,
    progress: Progress | None = None,
) -> tuple[dict[str, float], dict]:
    """Run the protocol of the module docstring on a loaded model.

    Args:
        model: ``UMGCLIP`` or a dense model with ``.umg`` (its ``umg`` is evaluated).
        preprocess: PIL -> (3, S, S) (``eval_transform(model)``).
        tokenizer: list[str] -> token ids.
        images: folder the COCO ``file_name`` entries are relative to.
        annotations: COCO instances JSON (category names are the class names).
        templates: prompts with ``{}``; None = the built-in ensemble.
        topk: categories submitted per box for AP; None = all.
        attribute: classify an annotation field (e.g. ``"umg.color"``) instead of the category
            (:func:`attribute_view`); None = categories.
        batch_size: images per forward pass.
        limit: evaluate only the first N images (by id) that have boxes.

    Returns:
        ``(metrics, info)``: ``acc1, acc5, mean_per_class_recall, box_ap, box_ap50`` (fractions); info holds
        the image, box and class counts and the templates.
    """
    umg = getattr(model, "umg", model)
    coco = load_coco(annotations)
    if attribute is not None:
        coco = attribute_view(coco, attribute)
    cat_ids = sorted(coco.getCatIds())
    if not cat_ids:
        raise EvalDataError(f"{annotations}: no categories")
    names = [coco.cats[c]["name"] for c in cat_ids]
    index_of = {c: i for i, c in enumerate(cat_ids)}
    text_emb = class_text_embeddings(umg, tokenizer, names, templates).to(device)

    work = []  # (image entry, annotations) of images with at least one non-crowd box
    for image_id in sorted(coco.getImgIds()):
        anns = [a for a in coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        if anns:
            work.append((coco.imgs[image_id], anns))
    work = work[:limit] if limit is not None else work
    if not work:
        raise EvalDataError(f"{annotations}: no image has a non-crowd box")

    all_probs, all_labels, detections = [], [], []
    k = len(cat_ids) if topk is None else min(topk, len(cat_ids))
    for start in range(0, len(work), batch_size):
        batch = work[start:start + batch_size]
        tensors, boxes = [], []
        for image, anns in batch:
            path = as_path(images) / image["file_name"]
            if not path.is_file():
                raise FileNotFoundError(f"image {path} (id {image['id']}) not found under {images}")
            with open_image(path) as pil:
                tensor = preprocess(pil.convert("RGB"))
                orig_hw = (pil.height, pil.width)
            tensors.append(tensor)
            xyxy = xywh_to_xyxy(torch.tensor([a["bbox"] for a in anns], dtype=torch.float32))
            boxes.append(scale_boxes_to_input(xyxy, orig_hw, tensor.shape[-1]).to(device))
        probs = region_probabilities(umg, torch.stack(tensors).to(device), boxes, text_emb).cpu()
        anns_flat = [a for _, anns in batch for a in anns]
        all_probs.append(probs)
        all_labels += [index_of[a["category_id"]] for a in anns_flat]
        scores, classes = probs.topk(k, dim=1)
        for ann, box_scores, box_classes in zip(anns_flat, scores.tolist(), classes.tolist(), strict=True):
            detections += [{"image_id": ann["image_id"], "category_id": cat_ids[c], "bbox": list(ann["bbox"]),
                            "score": s} for s, c in zip(box_scores, box_classes, strict=True)]
        if progress is not None:
            progress(start + len(batch), len(work))

    probs, labels = torch.cat(all_probs), torch.tensor(all_labels)
    evaluated = {image["id"] for image, _ in work}
    if len(evaluated) < len(coco.imgs):  # AP over the evaluated images only
        coco = _subset(coco, evaluated)
    box_ap, box_ap50 = coco_box_ap(coco, detections)
    metrics = {**classification_metrics(probs, labels, ks=(1, 5)), "box_ap": box_ap, "box_ap50": box_ap50}
    info = {"n_images": len(work), "n_boxes": int(labels.numel()), "n_classes": len(cat_ids), "attribute": attribute,
            "templates": list(templates) if templates is not None else list(DEFAULT_TEMPLATES)}
    return metrics, info


def run_regions(checkpoint: str, images: str | Path, annotations: str | Path, *, templates_file: Path | None = None,
                device: str = "cpu", cluster_in_eval: bool = False, **kwargs) -> dict:
    """Load ``checkpoint`` (any form ``create_model_and_transforms`` takes) and evaluate it; the result dict.

    Templates: ``templates_file``, else ``templates.txt`` beside the annotations, else the built-in ones.
    """
    templates = default_templates(as_path(annotations), templates_file)
    model, preprocess, tokenizer = create_model_and_transforms(checkpoint, device=device,
                                                               cluster_in_eval=cluster_in_eval)
    metrics, info = evaluate_regions(model, preprocess, tokenizer, images, annotations, templates=templates,
                                     device=device, **kwargs)
    dataset = as_path(annotations).stem + (f":{kwargs['attribute']}" if kwargs.get("attribute") else "")
    return make_result(TASK, dataset, str(checkpoint), metrics, **info)


def _subset(coco, image_ids: set[int]):
    """A ``COCO`` holding only ``image_ids`` (so images not evaluated add no false negatives)."""
    from pycocotools.coco import COCO

    data = coco.dataset
    sub = COCO()
    sub.dataset = {**data, "images": [i for i in data["images"] if i["id"] in image_ids],
                   "annotations": [a for a in data["annotations"] if a["image_id"] in image_ids]}
    with contextlib.redirect_stdout(io.StringIO()):
        sub.createIndex()
    return sub
