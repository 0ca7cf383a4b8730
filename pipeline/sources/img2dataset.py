"""img2dataset output: WebDataset tars and/or parquet files with the image bytes inside.

Containers are the ``*.tar`` and ``*.parquet`` files directly under ``root`` (img2dataset writes them
flat: ``00000.tar`` + ``00000.parquet`` metadata for ``output_format=webdataset``, or parquet files with
an image column for ``output_format=parquet``). A parquet file without an image column (``jpg``,
``jpeg``, ``png``, ``webp``) is metadata only and is skipped when a tar of the same stem exists.

* Refs are ``<container>/<sample key>`` (``00000.tar/000000012``); the item key is the sanitised
  sample key (img2dataset keys are unique across shards), ``source_id`` the ref.
* Tar members follow the WebDataset convention ``<key>.<ext>``: ``jpg``/``jpeg``/``png``/``webp`` hold
  the image, ``txt`` the alt text, ``json`` the metadata (its ``caption`` is used when there is no ``txt``).
* Parquet rows use the ``key`` column (the row number, zero-padded to 9 digits, when absent), the
  image column and ``caption``; a row whose image is null (img2dataset keeps failed downloads with
  ``status``/``error_message``) becomes a ``missing_image:`` item.
* A container that cannot be listed (corrupt, cut short) adds the ref ``<container>/`` that reads as an
  ``unreadable:`` error item, so the problem reaches the shard's error rows instead of vanishing.
* Text is decoded as UTF-8 with invalid bytes replaced (noted in ``known.notes``).

``read`` opens each container at most once per call and keeps only the members the batch asks for; tars
are read in random-access mode, so listing and reading seek over the members they do not need.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow.parquet as pq

from data_schemas import Caption
from pipeline.sources.base import KnownAnnotations, SourceItem
from pipeline.sources.folder import ALT_TEXT, decode_text, item_key

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_MEMBER = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")  # webdataset's key/extension split
_Members = dict[str, bytes]  # extension -> bytes (tar) or column -> value (parquet)


def _split_member(name: str) -> tuple[str, str] | None:
    match = _MEMBER.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


class Img2DatasetSource:
    """Samples of an img2dataset output folder; see the module docstring."""

    kind = "img2dataset"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._listing_errors: dict[str, str] = {}

    def containers(self) -> list[str]:
        """Sorted names of the tar/parquet files under ``root`` holding images."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"img2dataset root {self.root} is not a directory")
        files = [p for p in self.root.iterdir() if p.is_file() and not p.name.startswith(".")]
        tar_stems = {p.stem for p in files if p.suffix == ".tar"}
        names = []
        for path in files:
            if path.suffix == ".tar":
                names.append(path.name)
            elif path.suffix == ".parquet" and not (path.stem in tar_stems and _image_column(path) is None):
                names.append(path.name)
        return sorted(names)

    def list_refs(self) -> list[str]:
        """Sorted ``<container>/<key>`` refs; reads tar headers and parquet key columns only."""
        refs: set[str] = set()
        for name in self.containers():
            try:
                keys = self._keys(name)
            except _ListingError as exc:
                keys = exc.keys
                self._listing_errors[name] = exc.reason
                log.warning("img2dataset container %s: %s", name, exc.reason)
                refs.add(f"{name}/")
            refs.update(f"{name}/{key}" for key in keys)
        return sorted(refs)

    def read(self, refs: Sequence[str]) -> Iterator[SourceItem]:
        """One item per ref in order; each container named by ``refs`` is scanned once."""
        wanted: dict[str, set[str]] = defaultdict(set)
        for ref in refs:
            container, _, key = ref.partition("/")
            wanted[container].add(key)
        scanned: dict[str, tuple[dict[str, _Members], str | None]] = {}
        for ref in refs:
            container, _, key = ref.partition("/")
            if container not in scanned:
                scanned[container] = self._scan(container, wanted[container])
            found, scan_error = scanned[container]
            yield self._item(ref, key, found.get(key), scan_error)

    def _scan(self, container: str, keys: set[str]) -> tuple[dict[str, _Members], str | None]:
        """Members of the wanted ``keys`` in ``container``, and the error that stopped the scan (if any)."""
        found: dict[str, _Members] = {}
        path = self.root / container
        try:
            if container.endswith(".tar"):
                self._scan_tar(path, keys, found)
            elif container.endswith(".parquet"):
                self._scan_parquet(path, keys, found)
            else:
                return found, f"unreadable: {container}: not a .tar or .parquet container"
        except FileNotFoundError:
            return found, f"missing_image: {path}"
        except (OSError, tarfile.TarError, EOFError, ValueError) as exc:  # pyarrow errors are OSError/ValueError
            return found, f"unreadable: {container}: {exc}"
        if "" in keys and container not in self._listing_errors:  # a container ref read by a fresh instance
            try:
                self._keys(container)
            except _ListingError as exc:
                self._listing_errors[container] = exc.reason
        return found, self._listing_errors.get(container)

    def _item(self, ref: str, key: str, members: _Members | None, scan_error: str | None) -> SourceItem:
        item_id = item_key(key or ref)
        if not key:  # the container-level ref added when listing failed
            return SourceItem(item_id, ref, None, error=scan_error or f"unreadable: {ref}: could not be listed")
        if members is None:
            return SourceItem(item_id, ref, None, error=scan_error or f"missing_image: {ref}")
        known = KnownAnnotations()
        caption = _caption(members, known.notes, ref)
        if caption:
            known.captions.append(Caption(text=caption, annotator=ALT_TEXT))
        image = next((members[ext] for ext in IMAGE_EXTS if members.get(ext) is not None), None)
        if image is None:
            if scan_error:
                return SourceItem(item_id, ref, None, known, error=scan_error)
            status = members.get("status")
            detail = f" (status={_as_text(status)}: {_as_text(members.get('error_message'))})" if status else ""
            return SourceItem(item_id, ref, None, known, error=f"missing_image: {ref}{detail}")
        return SourceItem(item_id, ref, bytes(image), known)

    def _keys(self, container: str) -> list[str]:
        """Sample keys of one container; raises ``_ListingError`` (with the keys read so far) when broken."""
        return self._tar_keys(container) if container.endswith(".tar") else self._parquet_keys(container)

    # --- tar -------------------------------------------------------------------------------------

    def _tar_keys(self, name: str) -> list[str]:
        keys: list[str] = []
        try:
            with tarfile.open(self.root / name, mode="r:*") as tar:
                for member in tar:
                    split = _split_member(member.name) if member.isfile() else None
                    if split and (not keys or keys[-1] != split[0]):
                        keys.append(split[0])
        except (OSError, tarfile.TarError, EOFError) as exc:
            raise _ListingError(keys, f"unreadable: {name}: {exc} (after {len(set(keys))} samples)") from exc
        return sorted(set(keys))

    @staticmethod
    def _scan_tar(path: Path, keys: set[str], found: dict[str, _Members]) -> None:
        with tarfile.open(path, mode="r:*") as tar:
            for member in tar:
                split = _split_member(member.name) if member.isfile() else None
                if split is None or split[0] not in keys:
                    continue
                handle = tar.extractfile(member)
                if handle is not None:
                    found.setdefault(split[0], {})[split[1]] = handle.read()

    # --- parquet ---------------------------------------------------------------------------------

    def _parquet_keys(self, name: str) -> list[str]:
        try:
            pf = pq.ParquetFile(self.root / name)
            if _image_column(self.root / name, pf) is None:
                raise _ListingError([], f"unreadable: {name}: no image column (looked for {', '.join(IMAGE_EXTS)})")
            if "key" not in pf.schema_arrow.names:
                return [f"{i:09d}" for i in range(pf.metadata.num_rows)]
            keys = pf.read(columns=["key"]).column("key").to_pylist()
        except (OSError, ValueError) as exc:
            raise _ListingError([], f"unreadable: {name}: {exc}") from exc
        return [key if key else f"{i:09d}" for i, key in enumerate(keys)]

    @staticmethod
    def _scan_parquet(path: Path, keys: set[str], found: dict[str, _Members]) -> None:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        image_col = _image_column(path, pf)
        columns = [c for c in ("key", image_col, "caption", "status", "error_message") if c and c in names]
        row = 0
        for batch in pf.iter_batches(columns=columns, batch_size=256):
            for values in batch.to_pylist():
                key = values.get("key") or f"{row:09d}"
                row += 1
                if key in keys and key not in found:
                    found[key] = {("jpg" if col == image_col else col): val for col, val in values.items()}


class _ListingError(Exception):
    def __init__(self, keys: list[str], reason: str) -> None:
        super().__init__(reason)
        self.keys = keys
        self.reason = reason


def _image_column(path: Path, pf: pq.ParquetFile | None = None) -> str | None:
    try:
        names = (pf or pq.ParquetFile(path)).schema_arrow.names
    except (OSError, ValueError):
        return IMAGE_EXTS[0]  # unreadable: claim an image column so the file is listed and its error reported
    return next((ext for ext in IMAGE_EXTS if ext in names), None)


def _caption(members: _Members, notes: list[str], ref: str) -> str:
    text = members.get("txt")
    if text is None:
        text = members.get("caption")
    if text is None and members.get("json") is not None:
        try:
            meta = json.loads(decode_text(members["json"], notes, f"{ref}.json"))
        except json.JSONDecodeError:
            notes.append(f"bad_json: {ref}.json is not valid JSON")
            return ""
        text = meta.get("caption") if isinstance(meta, dict) else None
    if isinstance(text, bytes):
        text = decode_text(text, notes, f"{ref}.txt")
    return text.strip() if isinstance(text, str) else ""


def _as_text(value: object) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
