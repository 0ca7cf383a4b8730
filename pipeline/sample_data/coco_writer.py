"""COCO ``instances`` / ``captions`` JSON for digit scenes, with the ``"umg"`` extension objects.

Each image entry carries ``"umg": {"tags", "background", "captions"}`` and each annotation
``"umg": {"captions", "tags", "color"}`` (docs/sample_data.md lists the fields). Boxes and areas
come from the *visible* masks; masks are COCO RLE with ``counts`` as str. JSON is written with
sorted keys and no timestamps so the same seed gives the same bytes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.sample_data import templates
from pipeline.sample_data.scenes import Scene

INFO: dict[str, str] = {
    "description": "UMG-CLIP digit scenes: load_digits digits composited on skimage.data photos",
    "version": "1.0",
    "contributor": "umg-clip pipeline.sample_data",
    "url": "",
}


def categories() -> list[dict[str, Any]]:
    """The ten digit categories, ``id = digit + 1``."""
    return [{"id": d + 1, "name": word, "supercategory": "digit"} for d, word in enumerate(templates.DIGIT_WORDS)]


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool mask -> COCO compressed RLE ``{"size": [H, W], "counts": str}``."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def mask_bbox_xywh(mask: np.ndarray) -> list[float]:
    """Tight box of a non-empty (H, W) bool mask as COCO ``[x, y, w, h]`` (``x + w`` = max column + 1)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("empty mask has no box")
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1 - cols[0]), float(rows[-1] + 1 - rows[0])]


def reading_order(scene: Scene) -> list[int]:
    """Instance indices sorted left to right (then top to bottom) by their visible boxes."""
    boxes = [mask_bbox_xywh(m) for m in scene.visible_masks]
    return sorted(range(len(boxes)), key=lambda i: (boxes[i][0], boxes[i][1], i))


def scene_image_entry(image_id: int, file_name: str, scene: Scene) -> dict[str, Any]:
    """The COCO ``images`` entry of one scene, with its ``"umg"`` tags, background mask and captions."""
    instances = [(scene.placements[i].digit, scene.placements[i].color) for i in reading_order(scene)]
    background_mask = ~scene.visible_masks.any(axis=0)  # (0, H, W).any(0) is all False: all background
    word = scene.background if scene.background_named else None
    return {
        "id": image_id,
        "file_name": file_name,
        "width": scene.width,
        "height": scene.height,
        "umg": {
            "tags": [{"name": t, "score": 1.0} for t in templates.image_tags(instances, word)],
            "background": [{"label": word or "background", "segmentation": encode_rle(background_mask)}],
            "captions": templates.image_captions(instances, word),
        },
    }


def scene_annotations(image_id: int, first_id: int, scene: Scene) -> list[dict[str, Any]]:
    """COCO ``annotations`` of one scene in paste order, ids ``first_id, first_id + 1, ...``."""
    annotations = []
    for offset, (placement, mask) in enumerate(zip(scene.placements, scene.visible_masks, strict=True)):
        annotations.append(
            {
                "id": first_id + offset,
                "image_id": image_id,
                "category_id": placement.digit + 1,
                "bbox": mask_bbox_xywh(mask),
                "area": int(mask.sum()),
                "iscrowd": 0,
                "segmentation": encode_rle(mask),
                "umg": {
                    "captions": templates.region_captions(placement.digit, placement.color,
                                                          scene.background if scene.background_named else None),
                    "tags": templates.region_tags(placement.digit, placement.color),
                    "color": placement.color,
                },
            }
        )
    return annotations


def instances_json(images: list[dict[str, Any]], annotations: list[dict[str, Any]]) -> dict[str, Any]:
    """A COCO instances document."""
    return {"info": INFO, "licenses": [], "images": images, "annotations": annotations, "categories": categories()}


def captions_json(images: list[dict[str, Any]]) -> dict[str, Any]:
    """A COCO captions document: one annotation per image caption, ids 1-based in image order."""
    plain_images = [{k: v for k, v in image.items() if k != "umg"} for image in images]
    annotations = []
    for image in images:
        for caption in image["umg"]["captions"]:
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "caption": caption})
    return {"info": INFO, "licenses": [], "images": plain_images, "annotations": annotations}


def write_json(path: Path, document: Any) -> None:
    """Write ``document`` with sorted keys, compact separators and a trailing newline (byte-stable)."""
    path.write_text(json.dumps(document, sort_keys=True, separators=(",", ":")) + "\n", encoding="utf-8")


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """(H, W, 3) uint8 -> baseline JPEG bytes; 4:4:4 sampling keeps the digit colours crisp at edges."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling=0, optimize=False)
    return buffer.getvalue()
