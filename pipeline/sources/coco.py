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
  compressed RLE (``counts`` a string); all become a compressed-string ``Mask``. Coordinates and runs are
  validated before pycocotools sees them (``segmentation_to_rle``); a bad one drops the mask with a note.
* Every input is one row: a repeated image id adds the ref ``<id>#<n>`` (error ``duplicate_id``), an image id
  that only annotations or captions name adds its ref (error ``orphan_annotations``), an entry that is not an
  object adds ``!images/<i>`` / ``!annotations/<i>`` / ``!captions/<i>`` (error ``bad_annotation``).
* Images are read through ``pipeline.sources.confine`` under ``image_dir``: an absolute ``file_name`` or one
  whose ``../`` leaves the folder is an error row ``outside_root``. With an input ``root`` (a COCO root given
  as ``source.path``), the annotation / caption files must lie under it too, and an image folder that is a
  link resolving outside it makes every image an ``outside_root`` row (``source.follow_symlinks`` widens both).
* The sample-data generator's ``"umg"`` extension is read when present: on images ``tags`` ->
  ``known.tags`` and ``background`` -> ``known.background``; on annotations ``captions`` -> region
  captions and ``tags`` -> region tags (other fields such as ``color`` are ignored). Image captions come
  from the captions JSON when one is given, else from the image's ``umg.captions`` (the generator
  writes the same captions to both, so using one avoids duplicates).
* JSON files are decoded as UTF-8 with invalid bytes replaced. Images without annotations still give items.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from pathlib import PurePosixPath
from typing import Any

from pycocotools import mask as mask_utils
from pydantic import ValidationError

from data_schemas import RLE, BackgroundMask, Caption, Mask, Region, RegionCaption, Tag
from pipeline.sources.base import KnownAnnotations, SourceItem
from pipeline.masks import check_mask_size, check_rle
from pipeline.sources.confine import ReadPolicy, RefusedRead, confine_folder, read_confined
from pipeline.sources.folder import decode_text, item_key, read_file_item
from pipeline.storage import StoragePath, as_path

GROUND_TRUTH = "ground_truth"


def load_json(path: str | StoragePath, root: str | StoragePath | None = None, policy: ReadPolicy | None = None) -> Any:
    """Parse a JSON file read as UTF-8 with invalid bytes replaced, through ``confine`` (under ``root``, default the
    file's own folder: a link out of it is refused; a regular file of at most ``policy.max_annotation_bytes``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not JSON, is refused by ``confine`` or over the cap (message names the file).
    """
    path = as_path(path)
    policy = policy if policy is not None else ReadPolicy()
    try:
        data = read_confined(path, root if root is not None else path.parent, policy, policy.max_annotation_bytes,
                             "source.max_annotation_bytes")
    except RefusedRead as exc:
        if exc.tag == "missing_image":
            raise FileNotFoundError(f"annotation file {path} does not exist") from exc
        raise ValueError(f"annotation file refused: {exc.reason}") from exc
    try:
        return json.loads(decode_text(data))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc


def segmentation_to_rle(segmentation: Any, height: int | None, width: int | None) -> RLE:
    """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) as a compressed RLE.

    ``height``/``width`` are the image's, needed for polygons and uncompressed RLE. Everything is checked
    before pycocotools sees it (its C code neither bounds-checks RLE runs nor polygon coordinates): RLE runs
    must cover exactly ``h * w`` pixels (``pipeline.masks.check_rle``); polygon coordinates must be finite
    numbers within one image size of the image (``x`` in ``[-w, 2w]``, ``y`` in ``[-h, 2h]``).

    Raises:
        ValueError: the segmentation is malformed or does not match the image size.
    """
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if isinstance(counts, bytes):
            counts = counts.decode("ascii", errors="replace")
        h, w = check_mask_size(size)
        if height is not None and width is not None and (h, w) != (height, width):
            raise ValueError(f"RLE size [{h}, {w}] != image [h, w] [{height}, {width}]")
        check_rle(size, counts)
        if isinstance(counts, list):
            counts = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)["counts"].decode("ascii")
        return RLE(size=(h, w), counts=counts)
    if isinstance(segmentation, list):
        if height is None or width is None:
            raise ValueError("polygons need the image's height and width")
        polygons = [_polygon(i, poly, height, width) for i, poly in enumerate(segmentation)]
        if not polygons:
            raise ValueError("no polygon with at least 3 points")
        merged = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        return RLE(size=(height, width), counts=merged["counts"].decode("ascii"))
    raise ValueError(f"segmentation of type {type(segmentation).__name__} is neither polygons nor RLE")


def _polygon(index: int, poly: Any, height: int, width: int) -> list[float]:
    """One polygon ``[x0, y0, x1, y1, ...]`` as floats, checked (see ``segmentation_to_rle``)."""
    if not (isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0):
        size = len(poly) if isinstance(poly, list) else type(poly).__name__
        raise ValueError(f"polygon {index} has {size} values, not an even number >= 6 (3 points)")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in poly):
        raise ValueError(f"polygon {index} has a coordinate that is not a number")
    coords = [float(v) for v in poly]
    for axis, side, values in (("x", width, coords[0::2]), ("y", height, coords[1::2])):
        bad = next((v for v in values if not (math.isfinite(v) and -side <= v <= 2 * side)), None)
        if bad is not None:
            raise ValueError(f"polygon {index}: {axis}={bad} is not finite or lies over one image size "
                             f"outside the image ({axis} must be in [{-side}, {2 * side}])")
    return coords


def _image_size(image: dict[str, Any], notes: list[str]) -> tuple[int | None, int | None]:
    """``(height, width)`` from an image entry, or ``(None, None)`` with a note when they are unusable."""
    height, width = image.get("height"), image.get("width")
    if height is None and width is None:
        return None, None
    try:
        return check_mask_size([height, width])
    except ValueError as exc:
        notes.append(f"image height/width not usable ({exc}): polygon masks of this image are not read")
        return None, None


def _box_xyxy(bbox: Any) -> tuple[float, float, float, float]:
    if not (isinstance(bbox, list | tuple) and len(bbox) == 4):
        raise ValueError(f"bbox {bbox!r} is not [x, y, w, h]")
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise ValueError(f"bbox {list(bbox)} is not finite")
    if w <= 0 or h <= 0:
        raise ValueError(f"bbox {list(bbox)} has w<=0 or h<=0")
    return (x, y, x + w, y + h)


def _tags(raw: Any, notes: list[str]) -> list[Tag]:
    """``["name", ...]`` or ``[{"name", "score"}, ...]`` as ground-truth tags; a malformed entry is skipped with a
    line in ``notes`` (the others are kept)."""
    tags = []
    for index, entry in enumerate(raw if isinstance(raw, list) else [raw] if raw else []):
        try:
            if isinstance(entry, str):
                tags.append(Tag(name=entry, annotator=GROUND_TRUTH))
            else:
                tags.append(Tag(name=entry["name"], score=entry.get("score", 1.0), annotator=GROUND_TRUTH))
        except (ValidationError, KeyError, TypeError, AttributeError) as exc:
            notes.append(f"skipped tag {index}: {_short(exc)}")
    return tags


class CocoSource:
    """Images listed in a COCO instances JSON, with their boxes/masks/captions as known annotations."""

    kind = "coco"

    def __init__(
        self, annotations_json: str | StoragePath, image_dir: str | StoragePath,
        captions_json: str | StoragePath | None = None,
        policy: ReadPolicy | None = None, root: str | StoragePath | None = None,
    ) -> None:
        self.root = as_path(root) if root is not None else None  # the input root (None: each file's own folder)
        self.annotations_json = as_path(annotations_json)
        self.image_dir = as_path(image_dir)
        self.captions_json = as_path(captions_json) if captions_json is not None else None
        self.policy = policy if policy is not None else ReadPolicy()
        self._images: dict[str, dict[str, Any]] | None = None
        self._anns: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._captions: dict[str, list[Any]] = defaultdict(list)
        self._categories: dict[Any, str] = {}
        self._entry_errors: dict[str, str] = {}  # refs that read as error rows (duplicates, orphans, non-objects)

    def _index(self) -> dict[str, dict[str, Any]]:
        """Load the JSON files once: ref -> image entry, annotations/captions by image ref, error refs."""
        if self._images is not None:
            return self._images
        data = load_json(self.annotations_json, self.root, self.policy)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise ValueError(f"{self.annotations_json}: not a COCO instances file (no 'images' list)")
        captions = (load_json(self.captions_json, self.root, self.policy) if self.captions_json is not None
                    else {"annotations": []})
        if not isinstance(captions, dict):
            raise ValueError(f"{self.captions_json}: not a COCO captions file (no 'annotations' list)")
        categories = _entries(data, "categories", self.annotations_json)
        self._categories = {c.get("id"): str(c.get("name", "")) for c in categories if isinstance(c, dict)}
        self._group(data, "annotations", self._anns, lambda ann: ann)
        self._group(captions, "captions", self._captions, lambda entry: entry.get("caption"), field="annotations")
        images: dict[str, dict[str, Any]] = {}
        repeats: Counter = Counter()
        for index, image in enumerate(data["images"]):
            if not isinstance(image, dict):
                self._entry_errors[f"!images/{index}"] = f"bad_annotation: images[{index}] is not an object"
                continue
            ref = image_ref(image.get("id"))
            if ref in images:
                repeats[ref] += 1
                self._entry_errors[f"{ref}#{repeats[ref] + 1}"] = (
                    f"duplicate_id: images[{index}] (file_name {image.get('file_name')!r}) repeats image id "
                    f"{image.get('id')!r}; the first entry (file_name {images[ref].get('file_name')!r}) is kept")
                continue
            images[ref] = image
        for ref in sorted((self._anns.keys() | self._captions.keys()) - images.keys()):
            n_anns, n_caps = len(self._anns.get(ref, [])), len(self._captions.get(ref, []))
            self._entry_errors[ref] = (f"orphan_annotations: {n_anns} annotations and {n_caps} captions name image "
                                       f"id {ref}, which is not in 'images'")
        self._images = images
        return images

    def _group(self, document: dict[str, Any], what: str, into: dict[str, list[Any]], value, field: str = "") -> None:
        """Entries of ``document[field or what]`` grouped by image ref; a non-object entry is an error ref."""
        for index, entry in enumerate(_entries(document, field or what, what)):
            if isinstance(entry, dict):
                into[image_ref(entry.get("image_id"))].append(value(entry))
            else:
                self._entry_errors[f"!{what}/{index}"] = f"bad_annotation: {what}[{index}] is not an object"

    def list_refs(self) -> list[str]:
        """Sorted zero-padded image ids plus the error refs (parses the JSON once; opens no image)."""
        return sorted(self._index().keys() | self._entry_errors.keys())

    def read(self, refs: Sequence[str]) -> Iterator[SourceItem]:
        """One item per ref in order: the image file's bytes plus its known annotations."""
        images = self._index()
        folder_refused = confine_folder(self.image_dir, self.root, self.policy) if self.root is not None else None
        for ref in refs:
            image = images.get(ref)
            file_name = image.get("file_name") if image is not None else None
            if image is None or not isinstance(file_name, str) or not file_name:
                problem = self._entry_errors.get(ref, "bad_ref: image id not in annotations")
                if image is not None:
                    problem = "bad_annotation: no file_name"
                yield SourceItem(item_key(f"coco-{ref}"), ref, None, error=f"{problem} ({ref})")
                continue
            key = item_key(str(PurePosixPath(file_name).with_suffix("")))
            try:
                known = self._known(image)
            except (ValueError, TypeError, KeyError, AttributeError) as exc:  # read() must not raise per input
                yield SourceItem(key, file_name, None, error=f"bad_annotation: image {ref}: {_short(exc)}")
                continue
            if folder_refused is not None:
                yield SourceItem(key, file_name, None, known, error=folder_refused)
                continue
            yield read_file_item(key, file_name, self.image_dir / file_name, self.image_dir, self.policy, known)

    def _known(self, image: dict[str, Any]) -> KnownAnnotations:
        known = KnownAnnotations()
        height, width = _image_size(image, known.notes)
        extension = _extension(image)
        known.tags = _tags(extension.get("tags"), known.notes)
        for i, bg in enumerate(extension.get("background") or []):
            try:
                rle = segmentation_to_rle(bg["segmentation"], height, width)
                known.background.append(BackgroundMask(label=bg["label"], rle=rle, annotator=GROUND_TRUTH))
            except (ValidationError, ValueError, KeyError, TypeError) as exc:
                known.notes.append(f"skipped background {i}: {_short(exc)}")
        # The generator repeats image captions in umg.captions; the captions JSON wins when configured.
        ref = image_ref(image.get("id"))
        texts = self._captions.get(ref, []) if self.captions_json else extension.get("captions") or []
        for index, text in enumerate(texts if isinstance(texts, list) else [texts]):
            if not (isinstance(text, str) and text.strip()):
                known.notes.append(f"skipped empty caption {text!r}")
                continue
            try:
                known.captions.append(Caption(text=text.strip(), annotator=GROUND_TRUTH))
            except ValidationError as exc:  # e.g. a lone surrogate from a JSON "\ud800": this caption only
                known.notes.append(f"skipped caption {index}: {_short(exc)}")
        for index, ann in enumerate(self._anns.get(ref, [])):
            try:
                region = self._region(index, ann, height, width, known.notes)
            except (ValidationError, ValueError, TypeError, KeyError, AttributeError) as exc:  # this annotation only
                known.notes.append(f"skipped annotation {index}: malformed ({_short(exc)})")
                continue
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
            tags = _tags(extension.get("tags"), notes)
            return Region(id=index, box_xyxy=box, label=label, score=1.0, annotator=GROUND_TRUTH,
                          captions=captions, tags=tags, mask=mask)
        except (ValidationError, KeyError, TypeError, AttributeError) as exc:
            notes.append(f"skipped {where}: {_short(exc)}")
            return None


def _entries(document: dict[str, Any], field: str, origin: Any) -> list[Any]:
    entries = document.get(field) or []
    if not isinstance(entries, list):
        raise ValueError(f"{origin}: {field!r} is a {type(entries).__name__}, not a list")
    return entries


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
