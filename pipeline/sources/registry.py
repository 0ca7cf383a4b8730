"""Source registry: ``source.kind`` -> reader class, and ``build_source(cfg)`` with layout detection.

``kind: auto`` looks at ``source.path`` in this order and takes the first match:

=========  ==========================================================================
coco       ``annotations/instances_*.json`` under the path (or the path is such a file)
vg         ``region_descriptions.json`` under the path (or the path is that file)
img2dataset  ``*.tar`` (``.tar.gz`` …) or ``*.parquet`` directly under the path
folder     any image file below the path
=========  ==========================================================================

COCO from a root (``source.annotations`` unset) reads every split found as
``annotations/instances_<split>.json`` with images in the first existing of ``images/<split>/``,
``<split>/`` or ``images/`` (relative to ``source.image_dir`` when set, else to the root) and captions from
``annotations/captions_<split>.json`` when present. Refs are then ``<split>/<image ref>`` — always
prefixed, even with one split, so a ref does not change meaning when a split is added. To read a
single split, set ``source.annotations`` to its instances file (image folder and captions file are
inferred the same way unless ``source.image_dir`` / ``source.captions`` are set).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from data_schemas import ConfigError, SourceConfig
from pipeline.sources.base import Source, SourceItem
from pipeline.sources.coco import CocoSource
from pipeline.sources.confine import ReadPolicy, file_kind
from pipeline.sources.folder import FolderSource, item_key, looks_like_image
from pipeline.sources.img2dataset import Img2DatasetSource, is_container
from pipeline.sources.vg import VisualGenomeSource
from pipeline.storage import StoragePath, as_path, is_local

SOURCES: dict[str, type] = {
    "folder": FolderSource,
    "img2dataset": Img2DatasetSource,
    "coco": CocoSource,
    "vg": VisualGenomeSource,
}
_LOOKED_FOR = (
    "annotations/instances_*.json (coco), region_descriptions.json (vg), *.tar / *.parquet (img2dataset), "
    "image files .jpg/.png/.webp/… (any format Pillow decodes, folder)"
)


class SplitSource:
    """Several sources read as one; refs are ``<split>/<inner ref>``, sorted."""

    def __init__(self, kind: str, parts: dict[str, Source]) -> None:
        self.kind = kind
        self.parts = parts

    def list_refs(self) -> list[str]:
        return sorted(f"{split}/{ref}" for split, source in self.parts.items() for ref in source.list_refs())

    def read(self, refs: Sequence[str]) -> Iterator[SourceItem]:
        """One item per ref in order; consecutive refs of one split go to its source as one batch."""
        for split, run in itertools.groupby(refs, key=lambda ref: ref.partition("/")[0]):
            run = list(run)
            source = self.parts.get(split)
            if source is None:
                for ref in run:
                    yield SourceItem(item_key(f"{self.kind}-{ref}"), ref, None, error=f"bad_ref: no split {split!r}")
                continue
            yield from source.read([ref.partition("/")[2] for ref in run])


def detect_kind(path: StoragePath) -> str:
    """The source kind of ``path`` (see the module docstring).

    Raises:
        ConfigError: the path does not exist or holds none of the known layouts (message lists them).
    """
    if not path.exists():
        raise ConfigError(f"source.path {path} does not exist")
    if not path.is_file() and not path.is_dir():
        raise ConfigError(f"source.path {path} is a {file_kind(path.stat().st_mode)}, not a folder or a file")
    if path.is_file():
        if path.name.startswith("instances_") and path.suffix == ".json":
            return "coco"
        if path.name.startswith("region_descriptions") and path.suffix == ".json":
            return "vg"
        raise ConfigError(f"source.path {path} is a file; kind=auto accepts a folder holding {_LOOKED_FOR}")
    if any((path / "annotations").glob("instances_*.json")):
        return "coco"
    if (path / "region_descriptions.json").is_file():
        return "vg"
    if any(is_container(p.name) for p in path.iterdir() if p.is_file()):
        return "img2dataset"
    if _has_image(path):
        return "folder"
    raise ConfigError(f"source.path {path}: no known input layout; looked for {_LOOKED_FOR}")


def _has_image(root: StoragePath) -> bool:
    if not is_local(root):
        return bool(FolderSource(root).list_refs())
    for _, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(looks_like_image(name) for name in filenames):
            return True
    return False


def build_source(cfg: SourceConfig) -> Source:
    """The reader ``cfg`` describes.

    Raises:
        ConfigError: a required field is missing or a path does not exist (names the field).
    """
    kind = cfg.kind
    if kind == "auto":
        if cfg.path is not None:
            kind = detect_kind(as_path(cfg.path))
        elif cfg.annotations is not None:
            kind = detect_kind(as_path(cfg.annotations))
        else:
            raise ConfigError("source.path (or source.annotations) is required to detect the source kind")
    if kind == "coco":
        return _build_coco(cfg)
    if kind == "vg":
        return _build_vg(cfg)
    if kind not in SOURCES:
        raise ConfigError(f"source.kind {kind!r} is unknown; known kinds: auto, {', '.join(sorted(SOURCES))}")
    root = _require_dir(cfg.path, "source.path", kind)
    return SOURCES[kind](root, policy=read_policy(cfg))


def read_policy(cfg: SourceConfig) -> ReadPolicy:
    """The confined-read policy of ``cfg`` (size caps, ``follow_symlinks``); see ``pipeline.sources.confine``."""
    for folder in cfg.follow_symlinks:
        if not Path(folder).is_dir():
            raise ConfigError(f"source.follow_symlinks: {folder} is not a directory")
    return ReadPolicy.create(cfg.max_image_bytes, cfg.max_text_bytes, cfg.follow_symlinks, cfg.max_annotation_bytes,
                             cfg.allow_hard_links)


def _require_dir(path: str | StoragePath | None, field: str, kind: str) -> StoragePath:
    if path is None:
        raise ConfigError(f"{field} is required for source kind {kind}")
    if not as_path(path).is_dir():
        raise ConfigError(f"{field} {path} is not a directory (source kind {kind})")
    return as_path(path)


def _build_coco(cfg: SourceConfig) -> Source:
    annotations = cfg.annotations
    if annotations is None and cfg.path is not None and as_path(cfg.path).is_file():
        annotations = as_path(cfg.path)
    if annotations is not None:
        instances = as_path(annotations)
        image_dirs = _image_dirs(instances.parent.parent, _split_name(instances), cfg)
        root = as_path(cfg.path) if cfg.path is not None and as_path(cfg.path).is_dir() else None
        return _coco_split(instances, cfg.captions, image_dirs, read_policy(cfg), root)
    root = _require_dir(cfg.path, "source.path", "coco")
    files = sorted((root / "annotations").glob("instances_*.json"))
    if not files:
        raise ConfigError(f"source.path {root}: no annotations/instances_<split>.json for kind coco")
    if cfg.captions is not None and len(files) > 1:
        raise ConfigError(
            f"source.captions names one file but {root} has {len(files)} splits; set source.annotations to choose one"
        )
    policy = read_policy(cfg)
    parts: dict[str, Source] = {
        _split_name(f): _coco_split(f, cfg.captions, _image_dirs(root, _split_name(f), cfg, several=True), policy,
                                    root)
        for f in files
    }
    return SplitSource("coco", parts)


def _split_name(instances: StoragePath) -> str:
    return instances.stem.removeprefix("instances_")


def _image_dirs(root: StoragePath, split: str, cfg: SourceConfig, several: bool = False) -> list[StoragePath]:
    """Candidate image folders for ``split``, best first."""
    if cfg.image_dir is not None:
        image_dir = as_path(cfg.image_dir)
        return [image_dir / split, image_dir] if several else [image_dir]
    return [root / "images" / split, root / split, root / "images"]


def _coco_split(instances: StoragePath, captions: str | StoragePath | None, image_dirs: list[StoragePath],
                policy: ReadPolicy, root: StoragePath | None = None) -> CocoSource:
    """A ``CocoSource`` for one instances file; the image folder is the first existing candidate. ``root``: the
    input root (``source.path``) its files and image folder must resolve under."""
    if not instances.is_file():
        raise ConfigError(f"source.annotations {instances} does not exist")
    split = _split_name(instances)
    if captions is None and (instances.parent / f"captions_{split}.json").is_file():
        captions = instances.parent / f"captions_{split}.json"
    if captions is not None and not as_path(captions).is_file():
        raise ConfigError(f"source.captions {captions} does not exist")
    image_dir = next((d for d in image_dirs if d.is_dir()), None)
    if image_dir is None:
        tried = ", ".join(str(d) for d in image_dirs)
        raise ConfigError(f"no image folder for coco split {split!r}: tried {tried} (set source.image_dir)")
    return CocoSource(instances, image_dir, captions, policy, root)


def _build_vg(cfg: SourceConfig) -> Source:
    annotations = cfg.annotations
    if annotations is None:
        if cfg.path is None:
            raise ConfigError("source.path or source.annotations is required for source kind vg")
        path = as_path(cfg.path)
        annotations = path if path.is_file() else path / "region_descriptions.json"
    annotations = as_path(annotations)
    if not annotations.is_file():
        raise ConfigError(f"region descriptions file {annotations} does not exist (source kind vg)")
    image_dir = cfg.image_dir if cfg.image_dir is not None else annotations.parent
    if not as_path(image_dir).is_dir():
        raise ConfigError(f"source.image_dir {image_dir} is not a directory (source kind vg)")
    root = as_path(cfg.path) if cfg.path is not None and as_path(cfg.path).is_dir() else annotations.parent
    return VisualGenomeSource(annotations, image_dir, read_policy(cfg), root)
