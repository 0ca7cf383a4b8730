"""Readers for the evaluation layouts of zero-shot classification and retrieval.

- **ImageFolder** (classification): ``DIR/<class>/*.jpg|png|...``, one sub-folder per class, classes in
  sorted folder-name order (``torchvision.datasets.ImageFolder``). Optional ``DIR/classnames.txt``: one
  display name per line in that order (e.g. ImageNet's "tench" for ``n01440764``); else the folder
  names with ``_`` as space. Optional ``DIR/templates.txt``: one prompt per line with ``{}`` for the
  name; else the built-in templates. Empty class folders are an error.
- **COCO captions** (retrieval): ``{"images": [{"id", "file_name"}], "annotations": [{"image_id",
  "caption"}]}`` (COCO ``captions_*.json``, Karpathy splits converted the same way), any number of
  captions per image, file names relative to the images dir. An image listed without captions is left
  out; a caption of an unknown image id, or a listed image file that does not exist, is an error.

Every folder and file may be a local path or a URL (``s3://bucket/eval/…``, ``pipeline.storage``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
import io
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from pipeline.storage import StoragePath, as_path, find_files, is_local

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "templates.txt"


class EvalDataError(ValueError):
    """Evaluation data that does not fit its layout (message names the file or folder)."""


def read_lines(path: str | StoragePath) -> list[str]:
    """Non-empty stripped lines of a UTF-8 text file."""
    return [line.strip() for line in as_path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def open_image(path: str | StoragePath) -> Image.Image:
    """``Image.open`` for a path or URL (a remote file is read whole first); use as a context manager."""
    path = as_path(path)
    if is_local(path):
        return Image.open(path)
    with path.open("rb") as handle:
        return Image.open(io.BytesIO(handle.read()))


def _require_dir(path: str | StoragePath, what: str) -> StoragePath:
    path = as_path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} {path}: no such directory")
    return path


@dataclass
class ClassificationSet:
    """An ImageFolder plus its class display names and prompt templates (None = built-in)."""

    images: Dataset  # items: (image tensor, class index)
    classnames: list[str]
    templates: list[str] | None
    targets: list[int]


def read_image_folder(root: Path, transform: Callable, classnames_file: Path | None = None,
                      templates_file: Path | None = None) -> ClassificationSet:
    """Read an ImageFolder tree; ``classnames_file`` / ``templates_file`` (must exist when given) override
    the files in ``root``."""
    from torchvision.datasets import ImageFolder

    root = _require_dir(root, "data")
    if not any(p.is_dir() for p in root.iterdir()):
        raise EvalDataError(f"{root}: no class sub-folders (ImageFolder layout: DIR/<class>/<image>)")
    try:
        folder = ImageFolder(str(root), transform=transform) if is_local(root) else RemoteImageFolder(root, transform)
    except FileNotFoundError as exc:  # torchvision: "Found no valid file for the classes ..."
        raise EvalDataError(f"{root}: {exc}") from exc
    for given in (classnames_file, templates_file):
        if given is not None and not as_path(given).is_file():
            raise FileNotFoundError(f"{given}: no such file")
    classnames_file = as_path(classnames_file or root / CLASSNAMES_FILE)
    templates_file = as_path(templates_file or root / TEMPLATES_FILE)
    if classnames_file.exists():
        classnames = read_lines(classnames_file)
        if len(classnames) != len(folder.classes):
            raise EvalDataError(f"{classnames_file}: {len(classnames)} names for {len(folder.classes)} class "
                                "folders (one name per line, in sorted folder order)")
    else:
        classnames = [c.replace("_", " ") for c in folder.classes]
    templates = read_lines(templates_file) if templates_file.exists() else None
    if templates is not None and (not templates or any("{}" not in t for t in templates)):
        raise EvalDataError(f"{templates_file}: every line needs '{{}}' for the class name")
    return ClassificationSet(folder, classnames, templates, list(folder.targets))


class ImageFiles(Dataset):
    """Image files -> transformed tensors (items: (tensor, index))."""

    def __init__(self, paths: list[StoragePath], transform: Callable):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with open_image(self.paths[index]) as image:
            return self.transform(image.convert("RGB")), index


class RemoteImageFolder(Dataset):
    """``torchvision.datasets.ImageFolder`` over an object-store prefix: classes are the sorted sub-prefixes,
    images the objects below each with torchvision's image extensions (items: (tensor, class index))."""

    def __init__(self, root: StoragePath, transform: Callable):
        from torchvision.datasets.folder import IMG_EXTENSIONS

        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.samples = [(root / name / key, i) for i, name in enumerate(self.classes)
                        for key in find_files(root / name) if key.lower().endswith(IMG_EXTENSIONS)]
        empty = sorted(set(self.classes) - {path.parent.name for path, _ in self.samples})
        if empty:
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}")
        self.targets = [target for _, target in self.samples]
        self.images = ImageFiles([path for path, _ in self.samples], transform)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index][0], self.targets[index]


@dataclass
class CaptionSet:
    """Images and their captions; ``caption_image[j]`` is the index of caption j's image."""

    images: ImageFiles
    captions: list[str]
    caption_image: list[int]


def read_coco_captions(images_dir: str | StoragePath, captions_file: str | StoragePath,
                       transform: Callable) -> CaptionSet:
    """Read a COCO captions JSON whose ``file_name`` values are relative to ``images_dir``."""
    images_dir = _require_dir(images_dir, "images")
    captions_file = as_path(captions_file)
    if not captions_file.is_file():
        raise FileNotFoundError(f"captions {captions_file}: no such file")
    try:
        data = json.loads(captions_file.read_text(encoding="utf-8"))
        files = {int(im["id"]): im["file_name"] for im in data["images"]}
        pairs = [(int(a["image_id"]), str(a["caption"]).strip()) for a in data["annotations"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise EvalDataError(f"{captions_file}: not a COCO captions file ({exc!r}); need images[].id/file_name "
                            "and annotations[].image_id/caption") from exc
    unknown = sorted({i for i, _ in pairs} - files.keys())
    if unknown:
        raise EvalDataError(f"{captions_file}: captions of image ids not in 'images': {unknown[:5]}")
    with_captions = sorted({i for i, _ in pairs})
    paths = [images_dir / files[i] for i in with_captions]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise EvalDataError(f"{captions_file}: {len(missing)} image file(s) missing under {images_dir}, "
                            f"e.g. {missing[0]}")
    if not pairs:
        raise EvalDataError(f"{captions_file}: no captions")
    row = {image_id: n for n, image_id in enumerate(with_captions)}
    return CaptionSet(ImageFiles(paths, transform), [c for _, c in pairs], [row[i] for i, _ in pairs])
