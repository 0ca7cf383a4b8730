"""img2dataset output: WebDataset tars and/or parquet files with the image bytes inside.

Containers are the tar (``*.tar``, also compressed: ``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``) and
``*.parquet`` entries directly under ``root`` (img2dataset writes them flat: ``00000.tar`` + ``00000.parquet`` metadata for ``output_format=webdataset``, or parquet files with
an image column for ``output_format=parquet``). A parquet file without an image column (``jpg``,
``jpeg``, ``png``, ``webp``) is metadata only and is skipped when a tar of the same stem exists. Containers
are opened through ``pipeline.sources.confine``: one that is a FIFO, a device or a link out of the root
becomes a single error row (``not_a_regular_file:`` / ``outside_root:``).

* Refs are ``<container>/<sample key>`` (``00000.tar/000000012``); the item key is the sanitised
  sample key (img2dataset keys are unique across shards), ``source_id`` the ref.
* Tar members follow the WebDataset convention ``<key>.<ext>``: ``jpg``/``jpeg``/``png``/``webp`` (or
  another extension of a format Pillow decodes, ``IMAGE_EXTS``) hold the image, ``txt`` the alt text,
  ``json`` the metadata (its ``caption`` is used when there is no ``txt``).
  Member names are never used as paths (``../x.jpg`` is just the key ``../x``, sanitised).
* Every sample-looking member is accounted for: the n-th repeat of a member name (or of a parquet key)
  adds the ref ``<container>#dup<n>/<key>``, an error row ``duplicate_key:`` (the first is kept); a
  symlink, hard link or device member is ``not_a_regular_file:`` (a note when the sample still has a
  regular image); a member over ``source.max_image_bytes`` (text: ``max_text_bytes``) is ``too_large:``;
  an image-named member whose name starts with ``.`` (no WebDataset key) adds ``<container>#hidden/<name>``,
  an error row ``hidden_member:``.
* Parquet rows use the ``key`` column (any type, as text; the row number, zero-padded to 9 digits, when
  absent or empty), the image column and ``caption``; a row whose image is null (img2dataset keeps failed
  downloads with ``status``/``error_message``) becomes a ``missing_image:`` item, one whose image column is
  not binary (an int, a string …) a ``bad_column:`` item.
* A container that cannot be listed (corrupt, cut inside a header, garbage after the last member) adds
  the ref ``<container>/`` that reads as an ``unreadable:`` error item, so the problem reaches the shard's
  error rows instead of vanishing; the samples listed before the damage are kept.
* Text is decoded as UTF-8 with invalid bytes replaced (noted in ``known.notes``).

``read`` opens each container at most once per call and keeps only the members the batch asks for; tars
are read in random-access mode, so listing and reading seek over the members they do not need.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

import pyarrow.parquet as pq

from data_schemas import Caption
from pipeline.sources.base import KnownAnnotations, SourceItem
from pipeline.sources.confine import ReadPolicy, RefusedRead, open_confined
from pipeline.sources.folder import ALT_TEXT, IMAGE_EXTENSIONS, decode_text, item_key, looks_like_image
from pipeline.storage import StoragePath, as_path

log = logging.getLogger(__name__)

# Image members / columns, best first: img2dataset's four, then any other format Pillow decodes (a sample whose
# image is a .gif or .jfif member is read, not reported missing).
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", *sorted({e.lstrip(".") for e in IMAGE_EXTENSIONS} - {"jpg", "jpeg",
                                                                                                   "png", "webp"}))
PARQUET_IMAGE_COLUMNS = IMAGE_EXTS[:4]
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")  # compressed tars are read the same way
_MEMBER = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")  # webdataset's key/extension split
_DUP = re.compile(r"^(.+)#dup(\d+)$")  # container part of a duplicate's ref: 00000.tar#dup2
_HIDDEN = "#hidden"
_REFUSED = "!refused"  # members key holding the reasons a sample's members were not read
_Members = dict[str, Any]  # extension -> bytes (tar) or column -> value (parquet); _REFUSED -> [reason]


def _split_member(name: str) -> tuple[str, str] | None:
    match = _MEMBER.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


def _sample_refs(container: str, occurrences: Counter) -> list[str]:
    """``<container>/<key>`` per key, plus ``<container>#dup<n>/<key>`` for its n-th repeat (n >= 2)."""
    return [f"{container}/{key}" if n == 1 else f"{container}#dup{n}/{key}"
            for key, count in occurrences.items() for n in range(1, count + 1)]


class Img2DatasetSource:
    """Samples of an img2dataset output folder; see the module docstring."""

    kind = "img2dataset"

    def __init__(self, root: str | StoragePath, policy: ReadPolicy | None = None) -> None:
        self.root = as_path(root)
        self.policy = policy if policy is not None else ReadPolicy()
        self._listing_errors: dict[str, str] = {}

    def containers(self) -> list[str]:
        """Sorted names of the tar/parquet entries under ``root`` holding images (real folders skipped)."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"img2dataset root {self.root} is not a directory")
        entries = [p for p in self.root.iterdir() if is_container(p.name) and (p.is_symlink() or not p.is_dir())]
        tar_stems = {_stem(p.name) for p in entries if _is_tar(p.name)}
        names = []
        for path in entries:
            if path.suffix == ".parquet" and path.stem in tar_stems and self._metadata_only(path.name):
                continue
            names.append(path.name)
        return sorted(names)

    def list_refs(self) -> list[str]:
        """Sorted refs (see the module docstring); reads tar headers and parquet key columns only."""
        refs: set[str] = set()
        for name in self.containers():
            try:
                refs.update(self._refs(name))
            except _ListingError as exc:
                self._listing_errors[name] = exc.reason
                log.warning("img2dataset container %s: %s", name, exc.reason)
                refs.add(f"{name}/")
                refs.update(exc.refs)
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
            if container.endswith(_HIDDEN):
                name = container.removesuffix(_HIDDEN)
                yield SourceItem(item_key(f"{name}-{key}"), ref, None,
                                 error=f"hidden_member: {key} in {name} starts with '.'; WebDataset readers skip it")
                continue
            duplicate = _DUP.match(container)
            if duplicate:
                name, n = duplicate.groups()
                yield SourceItem(item_key(key), ref, None, error=f"duplicate_key: {key!r} occurs again in {name} "
                                 f"(occurrence {n}, a repeated member name or key); the first is kept")
                continue
            if container not in scanned:
                scanned[container] = self._scan(container, wanted[container])
            found, scan_error = scanned[container]
            yield self._item(ref, key, found.get(key), scan_error)

    def _open(self, container: str) -> BinaryIO:
        return open_confined(self.root / container, self.root, self.policy)

    def _scan(self, container: str, keys: set[str]) -> tuple[dict[str, _Members], str | None]:
        """Members of the wanted ``keys`` in ``container``, and the error that stopped the scan (if any)."""
        found: dict[str, _Members] = {}
        try:
            if _is_tar(container):
                self._scan_tar(container, keys, found)
            elif container.endswith(".parquet"):
                self._scan_parquet(container, keys, found)
            else:
                return found, f"unreadable: {container}: not a .tar or .parquet container"
        except RefusedRead as exc:
            return found, exc.reason
        except (OSError, tarfile.TarError, EOFError, ValueError, TypeError) as exc:  # pyarrow: also TypeError
            return found, f"unreadable: {container}: {exc}"
        if "" in keys and container not in self._listing_errors:  # a container ref read by a fresh instance
            try:
                self._refs(container)
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
        refused = members.get(_REFUSED, [])
        if image is None:
            if scan_error or refused:
                return SourceItem(item_id, ref, None, known, error=scan_error or refused[0])
            status = members.get("status")
            detail = f" (status={_as_text(status)}: {_as_text(members.get('error_message'))})" if status else ""
            return SourceItem(item_id, ref, None, known, error=f"missing_image: {ref}{detail}")
        if not isinstance(image, bytes | bytearray):  # a parquet image column of another type (int, string …)
            return SourceItem(item_id, ref, None, known, error=f"bad_column: {ref}: the image column holds "
                              f"{type(image).__name__}, not binary image bytes")
        if len(image) > self.policy.max_image_bytes:  # a parquet cell; tar members are refused before reading
            return SourceItem(item_id, ref, None, known, error=f"too_large: {ref} image is {len(image)} bytes, "
                              f"over source.max_image_bytes={self.policy.max_image_bytes}")
        known.notes.extend(f"skipped member: {reason}" for reason in refused)
        return SourceItem(item_id, ref, bytes(image), known)

    def _refs(self, container: str) -> list[str]:
        """Refs of one container; raises ``_ListingError`` (with the refs read so far) when broken."""
        return self._tar_refs(container) if _is_tar(container) else self._parquet_refs(container)

    # --- tar -------------------------------------------------------------------------------------

    def _tar_refs(self, name: str) -> list[str]:
        occurrences: Counter = Counter()
        hidden: list[str] = []
        try:
            with self._open(name) as handle, tarfile.open(fileobj=handle, mode="r:*") as tar:
                for member in tar:
                    split = _split_member(member.name) if not member.isdir() else None
                    if split is not None:
                        occurrences[split] += 1
                    elif not member.isdir() and looks_like_image(member.name):
                        hidden.append(f"{name}{_HIDDEN}/{member.name}")
                damage = _damaged_end(tar)
        except RefusedRead as exc:
            raise _ListingError([], exc.reason) from exc
        except (OSError, tarfile.TarError, EOFError) as exc:
            refs = self._tar_sample_refs(name, occurrences) + hidden
            raise _ListingError(refs, f"unreadable: {name}: {exc} (after {len(refs)} samples)") from exc
        refs = self._tar_sample_refs(name, occurrences) + hidden
        if damage:
            raise _ListingError(refs, f"unreadable: {name}: {damage} (after {len(refs)} samples)")
        return refs

    @staticmethod
    def _tar_sample_refs(name: str, occurrences: Counter) -> list[str]:
        per_key: Counter = Counter()
        for (key, _), count in occurrences.items():
            per_key[key] = max(per_key[key], count)
        return _sample_refs(name, per_key)

    def _scan_tar(self, container: str, keys: set[str], found: dict[str, _Members]) -> None:
        seen: Counter = Counter()
        with self._open(container) as handle, tarfile.open(fileobj=handle, mode="r:*") as tar:
            for member in tar:
                split = _split_member(member.name) if not member.isdir() else None
                if split is None or split[0] not in keys:
                    continue
                seen[split] += 1
                if seen[split] > 1:  # a repeat: its own ref reads as duplicate_key
                    continue
                members = found.setdefault(split[0], {})
                refused = self._refusal(container, member, split[1])
                if refused:
                    members.setdefault(_REFUSED, []).append(refused)
                    continue
                extracted = tar.extractfile(member)
                if extracted is not None:
                    members[split[1]] = extracted.read()

    def _refusal(self, container: str, member: tarfile.TarInfo, ext: str) -> str | None:
        if not member.isfile():
            kind = "symlink" if member.issym() else "hard link" if member.islnk() else "special"
            return f"not_a_regular_file: {member.name} is a {kind} member of {container}"
        cap, cap_name = ((self.policy.max_image_bytes, "source.max_image_bytes") if ext in IMAGE_EXTS
                         else (self.policy.max_text_bytes, "source.max_text_bytes"))
        if member.size > cap:
            return f"too_large: member {member.name} of {container} is {member.size} bytes, over {cap_name}={cap}"
        return None

    # --- parquet ---------------------------------------------------------------------------------

    def _metadata_only(self, name: str) -> bool:
        try:
            with self._open(name) as handle:
                return _image_column(pq.ParquetFile(handle)) is None
        except (RefusedRead, OSError, ValueError):
            return False  # unreadable: list it so the error is reported

    def _parquet_refs(self, name: str) -> list[str]:
        try:
            with self._open(name) as handle:
                pf = pq.ParquetFile(handle)
                if _image_column(pf) is None:
                    raise _ListingError([], f"unreadable: {name}: no image column (looked for {', '.join(PARQUET_IMAGE_COLUMNS)})")
                if "key" not in pf.schema_arrow.names:
                    return [f"{name}/{i:09d}" for i in range(pf.metadata.num_rows)]
                keys = pf.read(columns=["key"]).column("key").to_pylist()
        except RefusedRead as exc:
            raise _ListingError([], exc.reason) from exc
        except (OSError, ValueError, TypeError) as exc:  # pyarrow errors are OSError/ValueError/TypeError
            raise _ListingError([], f"unreadable: {name}: {exc}") from exc
        return _sample_refs(name, Counter(_parquet_key(key, i) for i, key in enumerate(keys)))

    def _scan_parquet(self, container: str, keys: set[str], found: dict[str, _Members]) -> None:
        with self._open(container) as handle:
            pf = pq.ParquetFile(handle)
            names = pf.schema_arrow.names
            image_col = _image_column(pf)
            columns = [c for c in ("key", image_col, "caption", "status", "error_message") if c and c in names]
            row = 0
            for batch in pf.iter_batches(columns=columns, batch_size=256):
                for values in batch.to_pylist():
                    key = _parquet_key(values.get("key"), row)
                    row += 1
                    if key in keys and key not in found:
                        found[key] = {("jpg" if col == image_col else col): val for col, val in values.items()}


def _is_tar(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES)


def _stem(name: str) -> str:
    """``00000`` of ``00000.tar`` / ``00000.tar.gz`` / ``00000.parquet``."""
    suffix = next((s for s in (*TAR_SUFFIXES, ".parquet") if name.lower().endswith(s)), "")
    return name[: len(name) - len(suffix)]


def is_container(name: str) -> bool:
    """Whether ``name`` is an img2dataset container: a tar (``.tar``, ``.tar.gz`` …) or a ``.parquet`` file."""
    return _is_tar(name) or name.lower().endswith(".parquet")


class _ListingError(Exception):
    def __init__(self, refs: list[str], reason: str) -> None:
        super().__init__(reason)
        self.refs = refs
        self.reason = reason


def _damaged_end(tar: tarfile.TarFile) -> str | None:
    """Why the archive ended early, or None: tarfile silently stops at a header cut short or garbage."""
    tar.fileobj.seek(tar.offset)
    block = tar.fileobj.read(tarfile.BLOCKSIZE)
    if not block.strip(b"\0"):
        return None  # the end-of-archive zero block, or the file ends exactly after a member
    what = "cut inside a header" if len(block) < tarfile.BLOCKSIZE else "an invalid header"
    return f"archive ends with {what} at byte {tar.offset}"


def _parquet_key(value: Any, row: int) -> str:
    """A parquet ``key`` cell as a string key: ints (img2dataset writes int64 keys too) and bytes as text; an
    empty or null key is the row number, zero-padded to 9 digits."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return f"{row:09d}" if value is None or value == "" else str(value)


def _image_column(pf: pq.ParquetFile) -> str | None:
    names = pf.schema_arrow.names
    return next((ext for ext in PARQUET_IMAGE_COLUMNS if ext in names), None)


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
