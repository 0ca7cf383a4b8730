"""A folder of image files (recursive), with optional ``<stem>.txt`` caption sidecars.

Refs are the image paths relative to the root in posix form (``sub/dir/cat.jpg``), which are also the
``source_id``; the key is the sanitised relative path without extension (``sub_dir_cat``). Hidden files
and folders (name starting with ``.``, e.g. macOS ``._cat.jpg`` resource forks) are skipped, and symlinked
folders are not followed, so the listing is finite and stable. Two files differing only in extension
(``cat.jpg``, ``cat.png``) get the same key; the shard writer reports that collision.

Sidecar text is decoded as UTF-8 with ``errors="replace"`` (invalid bytes become U+FFFD) and stripped:
a caption with a few bad bytes is still worth keeping, and a non-UTF-8 sidecar never fails the image.

``decode_text`` and ``item_key`` are shared by every reader in this package.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

from data_schemas import Caption, sanitize_key
from pipeline.sources.base import KnownAnnotations, SourceItem

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
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


def read_file_item(key: str, source_id: str, path: Path, known: KnownAnnotations | None = None) -> SourceItem:
    """An item with ``path``'s bytes, or an error item (``missing_image:`` / ``unreadable:``) — never raises."""
    known = known if known is not None else KnownAnnotations()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return SourceItem(key, source_id, None, known, error=f"missing_image: {path}")
    except OSError as exc:  # permission denied, a folder named like an image, I/O error ...
        return SourceItem(key, source_id, None, known, error=f"unreadable: {path}: {exc.strerror or exc}")
    return SourceItem(key, source_id, data, known)


class FolderSource:
    """Every image file under ``root``; see the module docstring for refs, keys and sidecars."""

    kind = "folder"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def list_refs(self) -> list[str]:
        """Sorted relative posix paths of the image files under ``root`` (no file is opened)."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"folder source root {self.root} is not a directory")
        refs = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = Path(dirpath).relative_to(self.root)
            for name in filenames:
                if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                    refs.append((rel_dir / name).as_posix())
        return sorted(refs)

    def read(self, refs: Sequence[str]) -> Iterator[SourceItem]:
        """One item per ref in order: the file's bytes plus the sidecar caption when there is one."""
        for ref in refs:
            known = KnownAnnotations()
            path = self.root / ref
            caption = self._sidecar_caption(path, known)
            if caption:
                known.captions.append(Caption(text=caption, annotator=ALT_TEXT))
            yield read_file_item(item_key(str(PurePosixPath(ref).with_suffix(""))), ref, path, known)

    @staticmethod
    def _sidecar_caption(image_path: Path, known: KnownAnnotations) -> str:
        sidecar = image_path.with_suffix(".txt")
        try:
            return decode_text(sidecar.read_bytes(), known.notes, sidecar.name).strip()
        except FileNotFoundError:
            return ""
        except OSError as exc:
            known.notes.append(f"sidecar_unreadable: {sidecar.name}: {exc.strerror or exc}")
            return ""
