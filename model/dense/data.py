"""COCO-format masks for dense adaptation: COCO panoptic (FC-CLIP's training data) or COCO instances.

- **Panoptic** (``panoptic_<split>.json`` + its PNG folder, ``id = R + 256 G + 256^2 B``): every non-crowd
  segment, thing *and stuff*, is one target mask with its category — as FC-CLIP's
  ``COCOPanopticNewBaselineDatasetMapper`` (crowd segments are left out, their pixels count as no object).
- **Instances** (``instances_<split>.json``, polygons or RLE through pycocotools ``annToMask``): thing
  objects only (a file without stuff categories trains no stuff class); crowd annotations dropped.

Categories outside the training vocabulary are dropped (their pixels count as "no object"), and so are
images left without any target (Mask2Former's loss needs one; detectron2's ``FILTER_EMPTY_ANNOTATIONS``).
The geometry — eval squash or FC-CLIP's large-scale jitter — is ``model.dense.augment.DenseTrainTransform``.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


@dataclass(frozen=True)
class CocoSource:
    """A COCO instances or panoptic JSON and the folder of its images (``panoptic_masks``: the PNG folder of a
    panoptic JSON; None for an instances file)."""

    annotations: Path
    images: Path
    panoptic_masks: Path | None = None

    @property
    def kind(self) -> str:
        return "instances" if self.panoptic_masks is None else "panoptic"

    @property
    def templates_file(self) -> Path:
        """``templates.txt`` next to the annotations (the eval layouts' prompt file), if any."""
        return self.annotations.parent / "templates.txt"


def coco_source(data: Path | None, split: str = "train", annotations: Path | None = None,
                images: Path | None = None, panoptic: Path | None = None,
                panoptic_masks: Path | None = None) -> CocoSource:
    """Where the dense training data is.

    ``--data ROOT [--split S]``: ``ROOT/annotations/panoptic_S.json`` (+ ``panoptic_S/`` PNGs) when it exists
    — FC-CLIP trains on COCO panoptic — else ``ROOT/annotations/instances_S.json``; images in
    ``ROOT/images/S/`` (the sample-data layout). Or explicit ``--panoptic FILE [--panoptic-masks DIR]`` /
    ``--annotations FILE``, each with ``--images DIR``.

    Raises:
        FileNotFoundError / ValueError: naming what is missing.
    """
    if panoptic is not None and annotations is not None:
        raise ValueError("give --panoptic or --annotations, not both")
    explicit = annotations if annotations is not None else panoptic
    if explicit is not None or images is not None:
        if explicit is None or images is None:
            raise ValueError("give --annotations (or --panoptic) and --images together")
        is_panoptic = panoptic is not None
        json_path, image_dir = Path(explicit), Path(images)
    elif data is None:
        raise ValueError("--task seg needs --data (or --panoptic / --annotations and --images)")
    else:
        json_path = Path(data) / "annotations" / f"panoptic_{split}.json"
        is_panoptic = json_path.is_file()
        if not is_panoptic:
            json_path = Path(data) / "annotations" / f"instances_{split}.json"
        image_dir = Path(data) / "images" / split
    png_dir = None
    if is_panoptic:
        png_dir = Path(panoptic_masks) if panoptic_masks is not None else json_path.with_suffix("")
    source = CocoSource(json_path, image_dir, png_dir)
    if not source.annotations.is_file():
        raise FileNotFoundError(f"COCO {source.kind} file not found: {source.annotations}")
    if not source.images.is_dir():
        raise FileNotFoundError(f"image folder not found: {source.images}")
    if png_dir is not None and not png_dir.is_dir():
        raise FileNotFoundError(f"panoptic PNG folder not found: {png_dir} (pass --panoptic-masks)")
    return source


def _vocabulary(categories: list[dict], classnames: list[str] | None, where: Path) -> tuple[list[str], dict[int, int]]:
    """(training class names, {category id: label}) for categories sorted by id."""
    cats = sorted(categories, key=lambda c: c["id"])
    names = {c["name"]: c["id"] for c in cats}
    chosen = list(classnames) if classnames else [c["name"] for c in cats]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise ValueError(f"train classes not among the categories of {where}: {unknown}; known: {sorted(names)}")
    return chosen, {names[n]: i for i, n in enumerate(chosen)}


class CocoMasks(Dataset):
    """(image (3, T, T), masks (N, T, T) float, labels (N,) int64 into ``classnames``) per image, from a COCO
    instances file.

    Args:
        source: the annotations and images.
        transform: (PIL image, (N, H, W) masks) -> (image, masks) (``DenseTrainTransform``).
        classnames: the training vocabulary (category names); None = every category, by id.

    Raises:
        ValueError: a class name that is not a category, or no image with a kept instance.
    """

    def __init__(self, source: CocoSource, transform, classnames: list[str] | None = None):
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress to stdout
            self.coco = COCO(str(source.annotations))
        self.classnames, self.label_of = _vocabulary(self.coco.loadCats(self.coco.getCatIds()), classnames,
                                                     source.annotations)
        self.source, self.transform = source, transform
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
        masks = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns])).float()
        labels = torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        with Image.open(self.source.images / info["file_name"]) as image:
            pixels, masks = self.transform(image, masks)
        return pixels, masks, labels


class CocoPanopticMasks(Dataset):
    """Like :class:`CocoMasks`, from a COCO panoptic JSON + PNGs: one target per non-crowd segment, things and
    stuff (FC-CLIP's training targets)."""

    def __init__(self, source: CocoSource, transform, classnames: list[str] | None = None):
        if source.panoptic_masks is None:
            raise ValueError(f"{source.annotations}: a panoptic source needs its PNG folder")
        document = json.loads(source.annotations.read_text(encoding="utf-8"))
        missing = [k for k in ("images", "annotations", "categories") if k not in document]
        if missing:
            raise ValueError(f"{source.annotations}: not a COCO panoptic file, no {missing} lists")
        self.classnames, self.label_of = _vocabulary(document["categories"], classnames, source.annotations)
        self.source, self.transform = source, transform
        files = {i["id"]: i["file_name"] for i in document["images"]}
        self.items = []
        for ann in sorted(document["annotations"], key=lambda a: a["image_id"]):
            segments = [s for s in ann["segments_info"] if not s.get("iscrowd", 0) and s["category_id"] in self.label_of]
            if segments:
                self.items.append((files[ann["image_id"]], ann["file_name"], segments))
        if not self.items:
            raise ValueError(f"no image in {source.annotations} has a segment of {self.classnames}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from model.eval.seg_eval import rgb_to_id

        image_file, png, segments = self.items[index]
        with Image.open(self.source.panoptic_masks / png) as ids:
            seg = torch.from_numpy(rgb_to_id(np.asarray(ids.convert("RGB"))))
        masks = torch.stack([(seg == s["id"]).float() for s in segments])
        labels = torch.tensor([self.label_of[s["category_id"]] for s in segments], dtype=torch.int64)
        with Image.open(self.source.images / image_file) as image:
            pixels, masks = self.transform(image, masks)
        return pixels, masks, labels


def dense_dataset(source: CocoSource, transform, classnames: list[str] | None = None) -> Dataset:
    """The dataset class for the source's kind (panoptic or instances)."""
    cls = CocoPanopticMasks if source.kind == "panoptic" else CocoMasks
    return cls(source, transform, classnames)


def collate(batch: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """-> images (B, 3, T, T), list of B (N_i, T, T) masks, list of B (N_i,) labels."""
    images, masks, labels = zip(*batch, strict=True)
    return torch.stack(images), list(masks), list(labels)
