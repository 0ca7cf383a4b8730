"""Export a shard build as one COCO JSON file (``pycocotools.coco.COCO(path)`` loads it).

What goes where:

============================  =================================================================
``images[]``                  ``id`` (1-based, shard order), ``file_name`` (``<key>.jpg``), ``width``,
                              ``height``; extensions ``umg_key``, ``umg_source_id``, ``umg_tags``
                              (``[{name, score}]``) and ``umg_captions`` (``[{text, clip_score, kept}]``)
``annotations[]``             one per region: ``bbox`` ``[x, y, w, h]``, ``area`` (mask pixels, else box
                              area), ``iscrowd`` 0, ``category_id``, ``score``, ``segmentation`` (COCO RLE,
                              only when the region has a kept mask); extensions ``umg_captions``
                              (region captions ``[{text, annotator}]``), ``umg_tags``, ``umg_region_id``,
                              ``umg_mask_stability``, ``umg_annotator``
``categories[]``              region labels, sorted by name, ids from 1
``umg_background[]``          background ("stuff") masks: ``image_id``, ``label``, ``segmentation``, ``score``
============================  =================================================================

With ``images_dir`` the JPEGs are written there under their ``file_name``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data_schemas import PIPELINE_VERSION, ImageRecord
from pipeline.masks import mask_area
from pipeline.shards import ShardError, finished_shards, iter_records
from pipeline.storage import as_path, is_local, write_bytes_whole


def _image_entry(image_id: int, record: ImageRecord) -> dict[str, Any]:
    return {
        "id": image_id, "file_name": f"{record.key}.jpg", "width": record.width, "height": record.height,
        "umg_key": record.key, "umg_source_id": record.source_id,
        "umg_tags": [{"name": t.name, "score": t.score} for t in record.tags],
        "umg_captions": [{"text": c.text, "clip_score": c.clip_score, "kept": c.kept} for c in record.captions],
    }


def _region_entry(image_id: int, region, category_id: int) -> dict[str, Any]:
    x1, y1, x2, y2 = region.box_xyxy
    entry: dict[str, Any] = {
        "image_id": image_id, "category_id": category_id, "bbox": [x1, y1, x2 - x1, y2 - y1],
        "area": float((x2 - x1) * (y2 - y1)), "iscrowd": 0, "score": region.score,
        "umg_region_id": region.id, "umg_annotator": region.annotator,
        "umg_captions": [{"text": c.text, "annotator": c.annotator} for c in region.captions],
        "umg_tags": [{"name": t.name, "score": t.score} for t in region.tags],
    }
    if region.mask is not None:
        rle = region.mask.rle
        entry["segmentation"] = {"size": list(rle.size), "counts": rle.counts}
        entry["area"] = float(mask_area(rle))
        entry["umg_mask_stability"] = region.mask.stability
    return entry


def build_coco(build_dir: str | Path, images_dir: str | Path | None = None) -> dict[str, Any]:
    """The COCO dict of every sample of the finished shards in ``build_dir``.

    Raises:
        ShardError: ``build_dir`` has no finished shard, or a sample does not validate.
    """
    if not finished_shards(build_dir):
        raise ShardError(f"{build_dir}: no finished shards to export")
    images, regions, background = [], [], []
    images_dir = as_path(images_dir) if images_dir is not None else None
    if images_dir is not None and is_local(images_dir):
        images_dir.mkdir(parents=True, exist_ok=True)
    for image_id, (record, jpg) in enumerate(iter_records(build_dir), start=1):
        images.append(_image_entry(image_id, record))
        regions += [(image_id, region) for region in record.regions]
        background += [{"image_id": image_id, "label": bg.label, "score": bg.score,
                        "segmentation": {"size": list(bg.rle.size), "counts": bg.rle.counts}}
                       for bg in record.background]
        if images_dir is not None:
            (images_dir / f"{record.key}.jpg").write_bytes(jpg)
    category_ids = {label: i for i, label in enumerate(sorted({r.label for _, r in regions}), start=1)}
    annotations = [{"id": ann_id, **_region_entry(image_id, region, category_ids[region.label])}
                   for ann_id, (image_id, region) in enumerate(regions, start=1)]
    return {
        "info": {"description": f"UMG-41M-style annotations exported from {as_path(build_dir).name}",
                 "version": PIPELINE_VERSION},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": label, "supercategory": "object"} for label, i in category_ids.items()],
        "umg_background": background,
    }


def export_coco(build_dir: str | Path, out_file: str | Path, images_dir: str | Path | None = None) -> dict[str, int]:
    """Write ``build_coco(build_dir)`` to ``out_file`` whole (paths or URLs, ``pipeline.storage``); returns counts."""
    coco = build_coco(build_dir, images_dir)
    out_file = as_path(out_file)
    if is_local(out_file):
        out_file.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_whole(out_file, json.dumps(coco).encode("utf-8"))
    return {"images": len(coco["images"]), "annotations": len(coco["annotations"]),
            "categories": len(coco["categories"]), "background": len(coco["umg_background"]),
            "masks": sum("segmentation" in a for a in coco["annotations"])}
