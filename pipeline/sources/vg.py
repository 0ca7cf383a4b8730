"""Visual Genome region descriptions as known regions.

Reads ``region_descriptions.json`` (a list of ``{"id": image_id, "regions": [{"region_id", "image_id",
"phrase", "x", "y", "width", "height"}]}``; ``image_id`` is accepted in place of ``id``) and the images
``<image_dir>/<image_id>.jpg``, also looked up in ``<image_dir>/VG_100K`` and ``<image_dir>/VG_100K_2`` as
the official download unpacks them. ``image_data.json`` is not needed: the true size comes from decoding.

* Refs are image ids zero-padded to 12 digits; the key is the id itself (``"1"``, as ``FolderSource``
  keys ``1.jpg``), ``source_id`` the image file name.
* Each region becomes a ``Region`` with ``id`` its index within the image, ``label`` the phrase and
  ``captions == [phrase]`` (annotator ``ground_truth``): VG regions carry a free-text phrase and no
  class, so the phrase doubles as the label. Regions with ``width``/``height`` <= 0, a non-finite
  coordinate or an empty phrase are skipped with a line in ``known.notes``; boxes are not clipped.
* Several entries for the same image id are merged (regions concatenated in file order). An entry without
  an id (or not an object) adds the ref ``!entries/<index>``, an error row ``bad_annotation:``.
* Images are read through ``pipeline.sources.confine`` under ``image_dir``: an id such as ``"../x"`` that
  escapes it is an error row ``outside_root:``. The JSON must resolve under the input ``root`` (``source.path``,
  else its own folder), and an image folder linked out of the root makes every image ``outside_root:``.
* The JSON is streamed (``ijson``, C backend), never loaded whole: ``list_refs`` keeps the ids only, and
  ``read(refs)`` (one call per shard, in whichever worker runs it) makes one pass that keeps the regions of
  those refs only, so a worker holds one shard's regions, not the GBs of the whole file. A file the strict
  streaming parser refuses (``NaN`` / ``Infinity``, which Python's ``json.dumps`` writes; invalid UTF-8) is
  parsed whole instead, under ``source.max_annotation_bytes``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Container, Iterable, Iterator, Sequence
from typing import Any

import ijson
from pydantic import ValidationError

from data_schemas import Region, RegionCaption
from pipeline.sources.base import KnownAnnotations, SourceItem
from pipeline.sources.coco import GROUND_TRUTH, image_ref, load_json
from pipeline.sources.confine import ReadPolicy, RefusedRead, confine_folder, open_confined
from pipeline.sources.folder import item_key, read_file_item
from pipeline.storage import StoragePath, as_path

log = logging.getLogger(__name__)

IMAGE_SUBDIRS = ("", "VG_100K", "VG_100K_2")


class VisualGenomeSource:
    """Images of a VG ``region_descriptions.json`` with their phrase-labelled regions."""

    kind = "vg"

    def __init__(self, region_descriptions_json: str | StoragePath, image_dir: str | StoragePath,
                 policy: ReadPolicy | None = None, root: str | StoragePath | None = None) -> None:
        self.root = as_path(root) if root is not None else None  # the input root (None: the JSON's own folder)
        self.region_descriptions_json = as_path(region_descriptions_json)
        self.image_dir = as_path(image_dir)
        self.policy = policy if policy is not None else ReadPolicy()
        self._entry_errors: dict[str, str] = {}  # refs of entries that read as error rows (from the last scan)

    def _json_root(self) -> StoragePath:
        return self.root if self.root is not None else self.region_descriptions_json.parent

    def _scan(self, wanted: Container[str]) -> dict[str, tuple[Any, list[dict[str, Any]]]]:
        """ref -> (image id, regions) for every entry, regions kept only for ``wanted`` refs; fills
        ``_entry_errors``. Streams the file (``ijson``); parses it whole only when it is not strict JSON."""
        try:
            return self._collect(self._streamed(), wanted)
        except (ijson.JSONError, UnicodeDecodeError) as exc:  # NaN / Infinity (Python's json.dumps writes them) …
            log.info("%s is not strict JSON for the streaming parser (%s); parsing it whole",
                     self.region_descriptions_json, exc)
        data = load_json(self.region_descriptions_json, self._json_root(), self.policy)  # capped, confined
        if not isinstance(data, list):
            raise ValueError(f"{self.region_descriptions_json}: expected a list of images with 'regions'")
        return self._collect(data, wanted)

    def _streamed(self) -> Iterator[Any]:
        """The entries of the top-level list, one at a time (the file is opened through ``confine``)."""
        path = self.region_descriptions_json
        try:
            handle = open_confined(path, self._json_root(), self.policy)
        except RefusedRead as exc:
            if exc.tag == "missing_image":
                raise FileNotFoundError(f"annotation file {path} does not exist") from exc
            raise ValueError(f"annotation file refused: {exc.reason}") from exc
        with handle:
            head = handle.read(64).lstrip()
            if not head.startswith((b"[", b"\xef\xbb\xbf")):
                raise ValueError(f"{path}: expected a list of images with 'regions'")
            handle.seek(0)
            yield from ijson.items(handle, "item", use_float=True)

    def _collect(self, entries: Iterable[Any], wanted: Container[str]) -> dict[str, tuple[Any, list[dict[str, Any]]]]:
        images: dict[str, tuple[Any, list[dict[str, Any]]]] = {}
        errors: dict[str, str] = {}
        for index, entry in enumerate(entries):
            image_id = entry.get("id", entry.get("image_id")) if isinstance(entry, dict) else None
            regions = entry.get("regions") if isinstance(entry, dict) else None
            if image_id is None or not isinstance(regions, list | None):
                errors[f"!entries/{index}"] = (
                    f"bad_annotation: entry {index} is not an object with an 'id' and a 'regions' list")
                continue
            ref = image_ref(image_id)
            slot = images.setdefault(ref, (image_id, []))
            if ref in wanted:
                slot[1].extend(regions or [])
        self._entry_errors = errors
        return images

    def list_refs(self) -> list[str]:
        """Sorted zero-padded image ids plus the error refs (streams the JSON once, keeping ids only)."""
        return sorted(self._scan(()).keys() | self._entry_errors.keys())

    def read(self, refs: Sequence[str]) -> Iterator[SourceItem]:
        """One item per ref in order: ``<image_id>.jpg`` bytes plus the image's regions (one streamed pass over
        the JSON keeps the regions of these refs only)."""
        images = self._scan(set(refs))
        folder_refused = confine_folder(self.image_dir, self.root, self.policy) if self.root is not None else None
        for ref in refs:
            if ref not in images:
                reason = self._entry_errors.get(ref, f"bad_ref: image id {ref} not in annotations")
                yield SourceItem(item_key(f"vg-{ref}"), ref, None, error=reason)
                continue
            image_id, raw_regions = images[ref]
            name = f"{image_id}.jpg"
            known = KnownAnnotations()
            for index, raw in enumerate(raw_regions):
                region = _region(index, raw, known.notes)
                if region is not None:
                    known.regions.append(region)
            if folder_refused is not None:
                yield SourceItem(item_key(str(image_id)), name, None, known, error=folder_refused)
                continue
            path = self._image_path(name)
            yield read_file_item(item_key(str(image_id)), name, path, self.image_dir, self.policy, known)

    def _image_path(self, name: str) -> StoragePath:
        """The first existing candidate, else the plain ``image_dir/name`` (reported as missing)."""
        for sub in IMAGE_SUBDIRS:
            candidate = self.image_dir / sub / name
            if candidate.is_file():
                return candidate
        return self.image_dir / name


def _region(index: int, raw: Any, notes: list[str]) -> Region | None:
    where = f"region {index} (region_id {raw.get('region_id') if isinstance(raw, dict) else None})"
    try:
        x, y, w, h = (float(raw[k]) for k in ("x", "y", "width", "height"))
        phrase = str(raw.get("phrase") or "").strip()
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        notes.append(f"skipped {where}: malformed ({exc})")
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        notes.append(f"skipped {where}: box {[x, y, w, h]} is not finite")
        return None
    if w <= 0 or h <= 0:
        notes.append(f"skipped {where}: box {[x, y, w, h]} has w<=0 or h<=0")
        return None
    if not phrase:
        notes.append(f"skipped {where}: empty phrase")
        return None
    try:
        return Region(id=index, box_xyxy=(x, y, x + w, y + h), label=phrase, score=1.0, annotator=GROUND_TRUTH,
                      captions=[RegionCaption(text=phrase, annotator=GROUND_TRUTH)])
    except ValidationError as exc:
        notes.append(f"skipped {where}: {exc.errors()[0]['msg']}")
        return None

