"""Fixtures for the source readers: tiny images and a COCO root in the sample-data layout."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils


def make_image_bytes(fmt: str = "JPEG", size: tuple[int, int] = (32, 24), color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def image_bytes():
    """``image_bytes(fmt="JPEG", size=(w, h), color=(r, g, b)) -> bytes``."""
    return make_image_bytes


def rle_str(mask: np.ndarray) -> dict:
    enc = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(enc["size"][0]), int(enc["size"][1])], "counts": enc["counts"].decode("ascii")}


def write_json(path: Path, document) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document), encoding="utf-8")


# Image 1 (32x24): a polygon annotation and an RLE annotation with "umg" extensions.
# Image 2: no annotations. Image 3: a zero-width box, a crowd box with uncompressed RLE reaching outside
# the image, an unknown category. Image 10: listed but its file is missing.
H, W = 24, 32
OBJ_MASK = np.zeros((H, W), bool)
OBJ_MASK[4:10, 20:30] = True
CATEGORIES = [{"id": 1, "name": "three", "supercategory": "digit"}, {"id": 2, "name": "seven"}]


def train_instances() -> dict:
    polygon = [[2.0, 2.0, 12.0, 2.0, 12.0, 12.0, 2.0, 12.0]]
    uncompressed = {"size": [H, W], "counts": _uncompressed_counts(OBJ_MASK)}
    return {
        "images": [
            {"id": 10, "file_name": "train_000009.jpg", "width": W, "height": H},
            {
                "id": 1,
                "file_name": "train_000000.jpg",
                "width": W,
                "height": H,
                "umg": {
                    "tags": [{"name": "three", "score": 1.0}, {"name": "red", "score": 0.5}],
                    "background": [{"label": "coffee", "segmentation": rle_str(~OBJ_MASK)}],
                    "captions": ["umg caption that must not duplicate the captions file"],
                },
            },
            {"id": 2, "file_name": "train_000001.jpg", "width": W, "height": H},
            {"id": 3, "file_name": "train_000002.jpg", "width": W, "height": H},
        ],
        "annotations": [
            {"id": 100, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "iscrowd": 0,
             "segmentation": polygon, "umg": {"captions": ["a red three"], "tags": ["three", "red"], "color": "red"}},
            {"id": 101, "image_id": 1, "category_id": 2, "bbox": [20, 4, 10, 6], "iscrowd": 0,
             "segmentation": rle_str(OBJ_MASK)},
            {"id": 300, "image_id": 3, "category_id": 1, "bbox": [5, 5, 0, 4], "segmentation": []},
            {"id": 301, "image_id": 3, "category_id": 2, "bbox": [-5, 2, 100, 100], "iscrowd": 1,
             "segmentation": uncompressed},
            {"id": 302, "image_id": 3, "category_id": 99, "bbox": [1, 1, 2, 2]},
        ],
        "categories": CATEGORIES,
    }


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return counts


@pytest.fixture
def coco_root(tmp_path) -> Path:
    """``root/images/{train,val}/…jpg`` + ``root/annotations/{instances,captions}_{train,val}.json``."""
    root = tmp_path / "digits"
    write_json(root / "annotations" / "instances_train.json", train_instances())
    write_json(
        root / "annotations" / "captions_train.json",
        {"annotations": [
            {"id": 1, "image_id": 1, "caption": "a red three and a seven"},
            {"id": 2, "image_id": 1, "caption": "  two digits  "},
            {"id": 3, "image_id": 2, "caption": ""},
        ]},
    )
    for i, color in enumerate([(200, 10, 10), (10, 200, 10), (10, 10, 200)]):
        path = root / "images" / "train" / f"train_{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(make_image_bytes(size=(W, H), color=color))
    write_json(
        root / "annotations" / "instances_val.json",
        {"images": [{"id": 1, "file_name": "val_000000.jpg", "width": W, "height": H}], "annotations": [],
         "categories": CATEGORIES},
    )
    (root / "images" / "val").mkdir(parents=True)
    (root / "images" / "val" / "val_000000.jpg").write_bytes(make_image_bytes(size=(W, H)))
    return root
