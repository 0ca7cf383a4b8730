"""A UMG-CLIP-like model whose embeddings are exact functions of the pixels, and data made for it.

Every input pixel is a token (patch size 1). A token's embedding is the one-hot of its "colour class":
red, green or blue when that normalised channel is the largest and above 1.0 (a saturated colour),
else "background" (the grey canvas). Region embeddings one-hot the class of the box's mean token, and
each class name's text embedding is its one-hot, so region and dense classification are exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from model.regions import as_rois, pool_region_features

CLASSES = ("red", "green", "blue", "background")
RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
GREY = (128, 128, 128)
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def colour_one_hot(feats: torch.Tensor) -> torch.Tensor:
    """(..., 3) normalised RGB -> (..., 4) one-hot of red / green / blue / background."""
    with_background = torch.cat([feats, torch.ones_like(feats[..., :1])], dim=-1)
    return F.one_hot(with_background.argmax(dim=-1), len(CLASSES)).float()


class _Head:
    def head(self, feats: torch.Tensor) -> torch.Tensor:
        return colour_one_hot(feats)


class PixelColourModel(nn.Module):
    """``encode_image``/``encode_regions``/``encode_text``/``tokens.head`` of a UMGCLIP, exact by colour."""

    def __init__(self, text_order: tuple[str, ...] = CLASSES):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # device probe
        self.tokens = _Head()
        self.text_order = text_order

    def encode_image(self, images: torch.Tensor):
        grid = images.permute(0, 2, 3, 1)  # (B, S, S, 3): one token per pixel
        return F.normalize(grid.mean(dim=(1, 2)), dim=-1), grid

    def encode_regions(self, grid, boxes, image_size):
        feats = pool_region_features(grid, as_rois(boxes), tuple(image_size))
        return colour_one_hot(feats)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.one_hot(tokens[:, 0], len(CLASSES)).float()

    def logit_scale_exp(self) -> torch.Tensor:
        return torch.tensor(100.0)


def tokenize(texts: list[str]) -> torch.Tensor:
    """Prompt "red" -> [[0]]: templates must be just "{}"."""
    return torch.tensor([[CLASSES.index(t)] for t in texts])


def preprocess_to(size: int):
    return v2.Compose([v2.ToImage(), v2.Resize((size, size), antialias=False,
                                               interpolation=v2.InterpolationMode.NEAREST),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


# Rectangles (colour, x, y, w, h) per image; images are W x H = 128 x 64 (squashed to 64 x 64 by 2 in x).
SCENES = [
    [("red", 8, 8, 24, 16), ("blue", 80, 30, 40, 24)],
    [("green", 64, 4, 32, 20), ("red", 100, 40, 20, 20), ("blue", 10, 36, 30, 20)],
    [("blue", 90, 6, 30, 30), ("green", 4, 40, 50, 20)],
]
SIZE_WH = (128, 64)


def make_colour_dataset(tmp_path: Path) -> Path:
    """images/, instances.json (category ids 5/7/9, names red/green/blue), masks/, classes.txt,
    templates.txt ("{}"), panoptic.json + panoptic/ (rectangles = things, grey = stuff "background")."""
    root = tmp_path / "colours"
    for sub in ("images", "masks", "panoptic"):
        (root / sub).mkdir(parents=True)
    cat_ids = {"red": 5, "green": 7, "blue": 9}
    images, annotations, pan_annotations = [], [], []
    for i, rects in enumerate(SCENES):
        w, h = SIZE_WH
        pixels = np.full((h, w, 3), GREY, dtype=np.uint8)
        label = np.full((h, w), CLASSES.index("background"), dtype=np.uint8)
        seg = np.full((h, w), 1, dtype=np.int64)  # segment 1 = the background stuff
        segments = [{"id": 1, "category_id": 4, "iscrowd": 0}]
        for k, (colour, x, y, bw, bh) in enumerate(rects):
            pixels[y:y + bh, x:x + bw] = RGB[colour]
            label[y:y + bh, x:x + bw] = CLASSES.index(colour)
            seg[y:y + bh, x:x + bw] = k + 2
            segments.append({"id": k + 2, "category_id": cat_ids[colour], "iscrowd": 0})
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cat_ids[colour],
                                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0, "attrs": {"paint": colour}})
        label[0, 0] = 255  # one ignored pixel
        Image.fromarray(pixels).save(root / "images" / f"img{i}.png")
        Image.fromarray(label).save(root / "masks" / f"img{i}.png")
        rgb = np.stack([seg % 256, seg // 256 % 256, seg // 65536], axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(root / "panoptic" / f"img{i}.png")
        images.append({"id": i + 1, "file_name": f"img{i}.png", "width": w, "height": h})
        pan_annotations.append({"image_id": i + 1, "file_name": f"img{i}.png", "segments_info": segments})
    categories = [{"id": cat_ids[c], "name": c, "supercategory": "colour"} for c in ("red", "green", "blue")]
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                     "categories": categories}))
    pan_categories = [{**c, "isthing": 1} for c in categories] + [{"id": 4, "name": "background", "isthing": 0}]
    (root / "panoptic.json").write_text(json.dumps({"images": images, "annotations": pan_annotations,
                                                    "categories": pan_categories}))
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root
