"""COCO detection/segmentation annotations (+ optional COCO captions) as known annotations.

* Refs are image ids zero-padded to 12 digits (``000000000139``) so string order is numeric order;
  a non-integer id is used as its string. Keys are the sanitised ``file_name`` without extension (the
  same key ``FolderSource`` gives that file), ``source_id`` is the ``file_name``.
* Every annotation of an image becomes a ``Region`` whose ``id`` is the annotation's index among that
  image's annotations (file order), so ids stay traceable even when one is skipped: ``bbox [x, y, w, h]``
  -> ``box_xyxy``, ``label`` the category name, ``score`` 1.0, annotator ``ground_truth``. Crowd
  annotations (``iscrowd: 1``) are kept like any other. Boxes are *not* clipped here (the true image size
  is known only after decoding); an annotation whose box has ``w <= 0`` or ``h <= 0``, an unknown category
  or a segmentation that cannot be read is skipped/left without mask, with a line in ``known.notes``.
* ``segmentation`` may be polygons (merged into one mask), uncompressed RLE (``counts`` a list) or
  compressed RLE (``counts`` a string); all become a compressed-string ``Mask``.
* The sample-data generator's ``"umg"`` extension is read when present: on images ``tags`` ->
  ``known.tags`` and ``background`` -> ``known.background``; on annotations ``captions`` -> region
  captions and ``tags`` -> region tags (other fields such as ``color`` are ignored). Image captions come
  from the captions JSON when one is given, else from the image's ``umg.captions`` (the generator
  writes the same captions to both, so using one avoids duplicates).
* JSON files are decoded as UTF-8 with invalid bytes replaced. Images without annotations still give items.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from pycocotools import mask as mask_utils
from pydantic import ValidationError

from data_schemas import RLE, BackgroundMask, Caption, Mask, Region, RegionCaption, Tag
from pipeline.sources.base import KnownAnnotations, SourceItem
from pipeline.sources.folder import decode_text, item_key, read_file_item

log = logging.getLogger(__name__)

GROUND_TRUTH = "ground_truth"


def load_json(path: str | Path) -> Any:
    """Parse a JSON file read as UTF-8 with invalid bytes replaced.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not JSON (message names the file).
    """
    path = Path(path)
    try:
        return json.loads(decode_text(path.read_bytes()))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc


def segmentation_to_rle(segmentation: Any, height: int | None, width: int | None) -> RLE:
    """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) as a compressed RLE.

    ``height``/``width`` are the image's, needed for polygons and uncompressed RLE.

    Raises:
        ValueError: the segmentation is malformed or does not match the image size.
    """
    if isinstance(segmentation, dict):
        size = segmentation.get("size")
        counts = segmentation.get("counts")
        if not (isinstance(size, list | tuple) and len(size) == 2):
            raise ValueError(f"RLE size {size!r} is not [h, w]")
        h, w = int(size[0]), int(size[1])
        if isinstance(counts, list):
            counts = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)["counts"]
        if isinstance(counts, bytes):
            counts = counts.decode("ascii")
        if not isinstance(counts, str) or not counts:
            raise ValueError("RLE counts is neither a list nor a non-empty string")
        if height is not None and width is not None and (h, w) != (height, width):
            raise ValueError(f"RLE size [{h}, {w}] != image [h, w] [{height}, {width}]")
        return RLE(size=(h, w), counts=counts)
    if isinstance(segmentation, list):
        if height is None or width is None:
            raise ValueError("polygons need the image's height and width")
        polygons = [
            [float(v) for v in poly]
            for poly in segmentation
            if isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0
        ]
        if not polygons:
            raise ValueError("no polygon with at least 3 points")
        merged = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        return RLE(size=(height, width), counts=merged["counts"].decode("ascii"))
    raise ValueError(f"segmentation of type {type(segmentation).__name__} is neither polygons nor RLE")


def _box_xyxy(bbox: Any) -> tuple[float, float, float, float]:
    if not (isinstance(bbox, list | tuple) and len(bbox) == 4):
        raise ValueError(f"bbox {bbox!r} is not [x, y, w, h]")
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise ValueError(f"bbox {list(bbox)} is not finite")
    if w <= 0 or h <= 0:
        raise ValueError(f"bbox {list(bbox)} has w<=0 or h<=0")
    return (x, y, x + w, y + h)


def _tags(raw: Any) -> list[Tag]:
    """``["name", ...]`` or ``[{"name", "score"}, ...]`` as ground-truth tags."""
    tags = []
    for entry in raw or []:
        if isinstance(entry, str):
            tags.append(Tag(name=entry, annotator=GROUND_TRUTH))
        else:
            tags.append(Tag(name=entry["name"], score=entry.get("score", 1.0), annotator=GROUND_TRUTH))
    return tags


class CocoSource:
    """Images listed in a COCO instances JSON, with their boxes/masks/captions as known annotations."""

    kind = "coco"

    def __init__(
        self, annotations_json: str | Path, image_dir: str | Path, captions_json: str | Path | None = None
    ) -> None:
        self.annotations_json = Path(annotations_json)
        self.image_dir = Path(image_dir)
        self.captions_json = Path(captions_json) if captions_json is not None else None
        self._images: dict[str, dict[str, Any]] | None = None
        self._anns: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        self._captions: dict[Any, list[str]] = defaultdict(list)
        self._categories: dict[Any, str] = {}

    def _index(self) -> dict[str, dict[str, Any]]:
        """Load the JSON files once: ref -> image entry, plus annotations/captions by image id."""
        if self._images is not None:
            return self._images
        data = load_json(self.annotations_json)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise ValueError(f"{self.annotations_json}: not a COCO instances file (no 'images' list)")
        captions = load_json(self.captions_json) if self.captions_json is not None else {"annotations": []}
        if not isinstance(captions, dict):
            raise ValueError(f"{self.captions_json}: not a COCO captions file (no 'annotations' list)")
        images: dict[str, dict[str, Any]] = {}
        try:
            self._categories = {c.get("id"): str(c.get("name", "")) for c in data.get("categories", [])}
            for ann in data.get("annotations", []):
                self._anns[ann.get("image_id")].append(ann)
            for entry in captions.get("annotations", []):
                self._captions[entry.get("image_id")].append(entry.get("caption"))
            for image in data["images"]:
                ref = image_ref(image.get("id"))
                if ref in images:
                    log.warning("%s: duplicate image id %s; keeping the first entry", self.annotations_json, ref)
                    continue
                images[ref] = image
        except (AttributeError, TypeError) as exc:  # an entry that is not an object
            raise ValueError(f"{self.annotations_json}: malformed COCO entry: {exc}") from exc
        self._images = images
        return images

    def list_refs(self) -> list[str]:
        """Sorted zero-padded image ids (parses the JSON once; opens no image)."""
        return sorted(self._index())

    def read(self, refs: Sequence[str]) -> Iterator[SourceItem]:
        """One item per ref in order: the image file's bytes plus its known annotations."""
        images = self._index()
        for ref in refs:
            image = images.get(ref)
            file_name = image.get("file_name") if image is not None else None
            if image is None or not isinstance(file_name, str) or not file_name:
                problem = "bad_ref: image id not in annotations" if image is None else "bad_annotation: no file_name"
                yield SourceItem(item_key(f"coco-{ref}"), ref, None, error=f"{problem} ({ref})")
                continue
            key = item_key(str(PurePosixPath(file_name).with_suffix("")))
            try:
                known = self._known(image)
            except (ValueError, TypeError, KeyError, AttributeError) as exc:  # read() must not raise per input
                yield SourceItem(key, file_name, None, error=f"bad_annotation: image {ref}: {_short(exc)}")
                continue
            yield read_file_item(key, file_name, self.image_dir / file_name, known)

    def _known(self, image: dict[str, Any]) -> KnownAnnotations:
        known = KnownAnnotations()
        height, width = image.get("height"), image.get("width")
        extension = _extension(image)
        try:
            known.tags = _tags(extension.get("tags"))
        except (ValidationError, KeyError, TypeError, AttributeError) as exc:
            known.notes.append(f"skipped image tags: {_short(exc)}")
        for i, bg in enumerate(extension.get("background") or []):
            try:
                rle = segmentation_to_rle(bg["segmentation"], height, width)
                known.background.append(BackgroundMask(label=bg["label"], rle=rle, annotator=GROUND_TRUTH))
            except (ValidationError, ValueError, KeyError, TypeError) as exc:
                known.notes.append(f"skipped background {i}: {_short(exc)}")
        # The generator repeats image captions in umg.captions; the captions JSON wins when configured.
        texts = self._captions.get(image.get("id"), []) if self.captions_json else extension.get("captions") or []
        for text in texts:
            if isinstance(text, str) and text.strip():
                known.captions.append(Caption(text=text.strip(), annotator=GROUND_TRUTH))
            else:
                known.notes.append(f"skipped empty caption {text!r}")
        for index, ann in enumerate(self._anns.get(image.get("id"), [])):
            region = self._region(index, ann, height, width, known.notes)
            if region is not None:
                known.regions.append(region)
        return known

    def _region(self, index: int, ann: dict[str, Any], height: Any, width: Any, notes: list[str]) -> Region | None:
        where = f"annotation {index} (id {ann.get('id')})"
        label = self._categories.get(ann.get("category_id"))
        if not label:
            notes.append(f"skipped {where}: unknown category_id {ann.get('category_id')!r}")
            return None
        try:
            box = _box_xyxy(ann.get("bbox"))
        except (ValueError, TypeError) as exc:
            notes.append(f"skipped {where}: {_short(exc)}")
            return None
        mask = None
        if ann.get("segmentation"):
            try:
                rle = segmentation_to_rle(ann["segmentation"], height, width)
                mask = Mask(rle=rle, annotator=GROUND_TRUTH)
            except (ValidationError, ValueError, TypeError) as exc:
                notes.append(f"{where}: mask dropped: {_short(exc)}")
        extension = _extension(ann)
        try:
            captions = [RegionCaption(text=t, annotator=GROUND_TRUTH) for t in extension.get("captions") or []]
            tags = _tags(extension.get("tags"))
            return Region(id=index, box_xyxy=box, label=label, score=1.0, annotator=GROUND_TRUTH,
                          captions=captions, tags=tags, mask=mask)
        except (ValidationError, KeyError, TypeError, AttributeError) as exc:
            notes.append(f"skipped {where}: {_short(exc)}")
            return None


def _extension(entry: dict[str, Any]) -> dict[str, Any]:
    extension = entry.get("umg")
    return extension if isinstance(extension, dict) else {}


def image_ref(image_id: Any) -> str:
    """An image id as a ref: non-negative ints zero-padded to 12 digits (string order = numeric order)."""
    if isinstance(image_id, int) and not isinstance(image_id, bool) and image_id >= 0:
        return f"{image_id:012d}"
    return str(image_id)


def _short(exc: Exception) -> str:
    """A one-line reason for notes (pydantic errors are multi-line)."""
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
    if isinstance(exc, KeyError):
        return f"missing field {exc.args[0]!r}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
