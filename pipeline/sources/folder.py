"""A folder of image files (recursive), with optional ``<stem>.txt`` caption sidecars.

Refs are the image paths relative to the root in posix form (``sub/dir/cat.jpg``), which are also the
``source_id``; the key is the sanitised relative path without extension (``sub_dir_cat``). Every entry whose
name ends in the extension of a format Pillow decodes (``IMAGE_EXTENSIONS``: ``.jpg``, ``.jfif``, ``.avif``,
``.tif``, ``.heic`` with pillow-heif …; a file named just ``.jpg`` too) is an input and ends as one row — including hidden files (``._cat.jpg`` macOS
forks become ``not_an_image`` rows; ``..%2f..%2fevil.jpg`` is read under the safe key ``2f_-2fevil``), FIFOs, devices
and symlinks. Hidden folders (``.git``, ``.cache``) and symlinked folders are not walked, so the listing is
finite and stable; a symlinked folder is walked only when it points into ``source.follow_symlinks``.
A folder that cannot be listed (permission denied) is the ref ``<folder>/``, an ``unreadable:`` error row.
Two files differing only in extension (``cat.jpg``, ``cat.png``) get the same key; the shard writer
reports that collision.

Files are read through ``pipeline.sources.confine``: a file (image or sidecar) that resolves outside the
root, is not a regular file or is over its size cap (``source.max_image_bytes`` / ``max_text_bytes``) is
refused before a byte is read — an image as an error row, a sidecar as a ``sidecar_skipped:`` note.

Sidecar text is decoded as UTF-8 with ``errors="replace"`` (invalid bytes become U+FFFD) and stripped:
a caption with a few bad bytes is still worth keeping, and a non-UTF-8 sidecar never fails the image.

``decode_text``, ``item_key`` and ``read_file_item`` are shared by every reader in this package.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

from data_schemas import Caption, sanitize_key
from pipeline.images import decodable_extensions
from pipeline.sources.base import KnownAnnotations, SourceItem
from pipeline.sources.confine import ReadPolicy, RefusedRead, read_confined
from pipeline.storage import StoragePath, as_path, find_files, is_local

IMAGE_EXTENSIONS = decodable_extensions()  # every format Pillow decodes here: .jpg .png .jfif .avif .tif …
ALT_TEXT = "alt_text"


def decode_text(data: bytes, notes: list[str] | None = None, what: str = "text") -> str:
    """Bytes of a text member/sidecar/JSON to ``str``: UTF-8 (BOM dropped), invalid bytes -> U+FFFD.

    When bytes had to be replaced and ``notes`` is given, ``"not_utf8: <what>: invalid bytes replaced"``
    is appended to it.
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        if notes is not None:
            notes.append(f"not_utf8: {what}: invalid bytes replaced")
        return data.decode("utf-8-sig", errors="replace")


def item_key(raw: str) -> str:
    """``sanitize_key(raw)``, or ``x<sha1[:16]>`` when nothing path-safe is left (e.g. an all-CJK name)."""
    try:
        return sanitize_key(raw)
    except ValueError:
        return "x" + hashlib.sha1(raw.encode("utf-8", errors="surrogatepass")).hexdigest()[:16]


def read_file_item(key: str, source_id: str, path: Path, root: Path, policy: ReadPolicy,
                   known: KnownAnnotations | None = None) -> SourceItem:
    """An item with ``path``'s bytes read through ``read_confined`` (``path`` must lie under ``root``), or an
    error item whose reason is the refusal (``missing_image:``, ``outside_root:``, ``not_a_regular_file:``,
    ``too_large:``, ``unreadable:``) — never raises."""
    known = known if known is not None else KnownAnnotations()
    try:
        data = read_confined(path, root, policy, policy.max_image_bytes)
    except RefusedRead as exc:
        return SourceItem(key, source_id, None, known, error=exc.reason)
    return SourceItem(key, source_id, data, known)


class FolderSource:
    """Every image file under ``root``; see the module docstring for refs, keys and sidecars."""

    kind = "folder"

    def __init__(self, root: str | StoragePath, policy: ReadPolicy | None = None) -> None:
        self.root = as_path(root)
        self.policy = policy if policy is not None else ReadPolicy()

    def list_refs(self) -> list[str]:
        """Sorted relative posix paths of the image-named entries under ``root`` (no file is opened)."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"folder source root {self.root} is not a directory")
        if not is_local(self.root):  # an object store: one recursive listing; "hidden folders" are key segments
            return [ref for ref in find_files(self.root)
                    if looks_like_image(ref) and not any(part.startswith(".") for part in ref.split("/")[:-1])]
        refs = []
        walked = {self.root.resolve()}

        def unlistable(exc: OSError) -> None:  # a folder that cannot be listed is one error row, not silence
            refs.append(Path(exc.filename).relative_to(self.root).as_posix() + "/")

        for dirpath, dirnames, filenames in os.walk(self.root, onerror=unlistable, followlinks=True):
            rel_dir = Path(dirpath).relative_to(self.root)
            kept = []
            for name in dirnames:
                if self._walk_into(Path(dirpath) / name, walked):
                    kept.append(name)
                elif looks_like_image(name):  # e.g. a link named cat.jpg to a folder: an input we refuse
                    refs.append((rel_dir / name).as_posix())
            dirnames[:] = kept
            refs.extend((rel_dir / name).as_posix() for name in filenames if looks_like_image(name))
        return sorted(refs)

    def _walk_into(self, path: Path, walked: set[Path]) -> bool:
        """Hidden folders are never walked; a symlinked folder only when it points into ``follow_symlinks``."""
        if path.name.startswith("."):
            return False
        if path.is_symlink():
            target = path.resolve()
            if target in walked or not any(target.is_relative_to(p) for p in self.policy.follow_symlinks):
                return False
            walked.add(target)
        return True

    def read(self, refs: Sequence[str]) -> Iterator[SourceItem]:
        """One item per ref in order: the file's bytes plus the sidecar caption when there is one."""
        for ref in refs:
            if ref.endswith("/"):
                yield SourceItem(item_key(ref), ref, None, error=self._unlistable_reason(ref))
                continue
            known = KnownAnnotations()
            path = self.root / ref
            caption = self._sidecar_caption(path, known)
            if caption:
                known.captions.append(Caption(text=caption, annotator=ALT_TEXT))
            key = item_key(str(PurePosixPath(ref).with_suffix("")))
            yield read_file_item(key, ref, path, self.root, self.policy, known)

    def _unlistable_reason(self, ref: str) -> str:
        try:
            os.listdir(self.root / ref)
        except OSError as exc:
            return f"unreadable: folder {self.root / ref} cannot be listed: {exc.strerror or exc}"
        return f"unreadable: folder {self.root / ref} could not be listed when the build was planned"

    def _sidecar_caption(self, image_path: Path, known: KnownAnnotations) -> str:
        sidecar = image_path.with_suffix(".txt")
        try:
            data = read_confined(sidecar, self.root, self.policy, self.policy.max_text_bytes, "source.max_text_bytes")
        except RefusedRead as exc:
            if exc.tag != "missing_image" or sidecar.is_symlink():  # a dangling link is worth a note
                known.notes.append(f"sidecar_skipped: {exc.reason}")
            return ""
        return decode_text(data, known.notes, sidecar.name).strip()


def looks_like_image(name: str) -> bool:
    """Whether a file name ends in one of ``IMAGE_EXTENSIONS`` (case-insensitive), a name that is only an
    extension (``.jpg``) included."""
    _, dot, ext = name.rpartition(".")
    return bool(dot) and f".{ext.lower()}" in IMAGE_EXTENSIONS
