"""COCO-format instance masks for dense adaptation: images squashed to the model's S x S, masks likewise.

Images go through the public eval preprocess (``model.preprocess.eval_transform``: the whole image
resized to S x S), masks (pycocotools ``annToMask``: polygons or RLE) through a nearest resize to the same
grid, so they stay aligned. Annotations of categories outside the training vocabulary and crowd
annotations are dropped (their pixels count as "no object"), and so are images left without any
instance (Mask2Former's loss needs at least one target per image).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset


@dataclass(frozen=True)
class CocoSource:
    """A COCO instances JSON and the folder of its images."""

    annotations: Path
    images: Path

    @property
    def templates_file(self) -> Path:
        """``templates.txt`` next to the annotations (the eval layouts' prompt file), if any."""
        return self.annotations.parent / "templates.txt"


def coco_source(data: Path | None, split: str = "train", annotations: Path | None = None,
                images: Path | None = None) -> CocoSource:
    """``--data ROOT [--split S]`` (``ROOT/annotations/instances_S.json`` + ``ROOT/images/S/``, the sample
    data layout) or explicit ``--annotations FILE --images DIR``.

    Raises:
        FileNotFoundError / ValueError: naming what is missing.
    """
    if annotations is not None or images is not None:
        if annotations is None or images is None:
            raise ValueError("give --annotations and --images together")
        source = CocoSource(Path(annotations), Path(images))
    elif data is None:
        raise ValueError("--task seg needs --data (or --annotations and --images)")
    else:
        source = CocoSource(Path(data) / "annotations" / f"instances_{split}.json", Path(data) / "images" / split)
    if not source.annotations.is_file():
        raise FileNotFoundError(f"COCO instances file not found: {source.annotations}")
    if not source.images.is_dir():
        raise FileNotFoundError(f"image folder not found: {source.images}")
    return source


class CocoMasks(Dataset):
    """(image (3, S, S), masks (N, S, S) float, labels (N,) int64 into ``classnames``) per image.

    Args:
        source: the annotations and images.
        transform: PIL -> (3, S, S) (``eval_transform(model)``).
        size: S.
        classnames: the training vocabulary (category names); None = every category, by id.

    Raises:
        ValueError: a class name that is not a category, or no image with a kept instance.
    """

    def __init__(self, source: CocoSource, transform, size: int, classnames: list[str] | None = None):
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress to stdout
            self.coco = COCO(str(source.annotations))
        cats = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
        names = {c["name"]: c["id"] for c in cats}
        self.classnames = list(classnames) if classnames else [c["name"] for c in cats]
        unknown = [n for n in self.classnames if n not in names]
        if unknown:
            raise ValueError(f"train classes not among the categories of {source.annotations}: {unknown}; "
                             f"known: {sorted(names)}")
        self.label_of = {names[n]: i for i, n in enumerate(self.classnames)}
        self.source, self.transform, self.size = source, transform, size
        self.items = []
        for image_id in sorted(self.coco.getImgIds()):
            anns = [a for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id, iscrowd=False))
                    if a["category_id"] in self.label_of]
            if anns:
                self.items.append((image_id, anns))
        if not self.items:
            raise ValueError(f"no image in {source.annotations} has an instance of {self.classnames}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image_id, anns = self.items[index]
        info = self.coco.loadImgs(image_id)[0]
        with Image.open(self.source.images / info["file_name"]) as image:
            pixels = self.transform(image.convert("RGB"))
        masks = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns])).float()
        masks = F.interpolate(masks[None], size=(self.size, self.size), mode="nearest")[0]
        labels = torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        return pixels, masks, labels


def collate(batch: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """-> images (B, 3, S, S), list of B (N_i, S, S) masks, list of B (N_i,) labels."""
    images, masks, labels = zip(*batch, strict=True)
    return torch.stack(images), list(masks), list(labels)
