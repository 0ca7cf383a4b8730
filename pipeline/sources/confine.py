"""Confined reads: only regular files under the input root (or a link target the user named), size-capped.

Every reader in this package opens input files through ``open_confined`` / ``read_confined``:

1. the path is resolved (symlinks followed) and must lie under the input ``root`` or under one of
   ``ReadPolicy.follow_symlinks`` (folders the user allowed links to point into, ``--follow-symlinks``);
2. the resolved file must be a regular file — a FIFO, socket, device or folder is refused before it is
   opened, and opened with ``O_NONBLOCK | O_NOFOLLOW`` and checked again with ``fstat``;
3. its size (from ``fstat``, before any byte is read) must not exceed the cap the caller gives; the read
   asks for that size + 1 bytes (never the cap: a 1 KB file reserves ~1 KB, not 256 MiB), so a file
   growing under us is still caught, and stops at the cap.

4. a hard link (a regular file with ``st_nlink > 1``) is refused unless ``ReadPolicy.allow_hard_links``: its
   other names cannot be seen from its path, so a hard link planted in the input may be another name of a file
   outside the root (``/etc/shadow`` on the same file system) that no path check would catch. Reading one is
   an explicit choice (``source.allow_hard_links: true``, e.g. for a deduplicated or ``cp -al`` snapshot tree).

An input root given as a URL (``s3://bucket/prefix``, ``pipeline.storage``) keeps the same guarantees: the
object's key must lie under the prefix with no ``.``, ``..`` or empty segments (a gateway may collapse them),
it must be an object (not a "folder" prefix), and its size from the store must not exceed the cap; at most
cap + 1 bytes are read. Object stores have no symlinks, FIFOs or devices.

A refused read raises ``RefusedRead`` whose ``reason`` starts with the tag its error row gets:
``missing_image``, ``outside_root``, ``not_a_regular_file``, ``hard_link``, ``too_large`` or ``unreadable``.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.storage import inside, is_local

DEFAULT_MAX_IMAGE_BYTES = 256 * 2**20
DEFAULT_MAX_TEXT_BYTES = 2**20
DEFAULT_MAX_ANNOTATION_BYTES = 2 * 2**30  # a COCO / VG JSON parsed whole takes several times its size in memory

_KINDS = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


class RefusedRead(Exception):
    """A file the confined reader will not read; ``reason`` is ``"<tag>: <detail>"`` (see module docstring)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    @property
    def tag(self) -> str:
        return self.reason.split(":", 1)[0]


@dataclass(frozen=True)
class ReadPolicy:
    """What a source may read: caps in bytes and the extra folders symlinks may point into (resolved)."""

    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES
    follow_symlinks: tuple[Path, ...] = ()
    max_annotation_bytes: int = DEFAULT_MAX_ANNOTATION_BYTES
    allow_hard_links: bool = False

    @classmethod
    def create(cls, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES,
               follow_symlinks: Iterable[str | Path] = (),
               max_annotation_bytes: int = DEFAULT_MAX_ANNOTATION_BYTES, allow_hard_links: bool = False) -> ReadPolicy:
        """A policy with ``follow_symlinks`` resolved once (a relative folder is taken from the cwd)."""
        return cls(max_image_bytes, max_text_bytes, tuple(Path(p).resolve() for p in follow_symlinks),
                   max_annotation_bytes, allow_hard_links)

    def allowed_roots(self, root: Path) -> tuple[Path, ...]:
        return (Path(root).resolve(), *self.follow_symlinks)


def file_kind(mode: int) -> str:
    """``"directory"``, ``"FIFO"`` … for a non-regular ``st_mode``; ``"regular file"`` otherwise."""
    return next((name for test, name in _KINDS if test(mode)), "regular file" if stat.S_ISREG(mode) else "special file")


def confine(path: str | Path, root: str | Path, policy: ReadPolicy) -> Path:
    """The resolved ``path`` when it is a regular file under ``root`` (or an allowed link target).

    Raises:
        RefusedRead: ``missing_image``, ``outside_root``, ``not_a_regular_file`` or ``unreadable``.
    """
    if not is_local(path) and not isinstance(path, str):
        return _confine_remote(path, root, None)[0]
    path = Path(path)
    try:
        resolved = path.resolve(strict=True)
    except FileNotFoundError as exc:
        raise RefusedRead(f"missing_image: {path}") from exc
    except (OSError, RuntimeError) as exc:  # symlink loop (RuntimeError before Python 3.13), permission denied
        raise RefusedRead(f"unreadable: {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    if not any(resolved.is_relative_to(allowed) for allowed in policy.allowed_roots(root)):
        raise RefusedRead(
            f"outside_root: {path} resolves to {resolved}, outside the input root {root}"
            " (--follow-symlinks names folders links may point into)"
        )
    mode = resolved.stat().st_mode
    if not stat.S_ISREG(mode):
        raise RefusedRead(f"not_a_regular_file: {path} is a {file_kind(mode)}")
    return resolved


def confine_folder(folder: str | Path, root: str | Path, policy: ReadPolicy) -> str | None:
    """None when ``folder`` resolves under ``root`` (or an allowed link target), else the ``outside_root:`` reason
    every file read from it gets (an image folder that is a link out of a COCO / VG root)."""
    if not is_local(folder) or not is_local(root):
        return None  # object stores have no links; keys are checked per object (``_confine_remote``)
    resolved = Path(folder).resolve()
    if any(resolved.is_relative_to(allowed) for allowed in policy.allowed_roots(root)):
        return None
    return (f"outside_root: image folder {folder} resolves to {resolved}, outside the input root {root} "
            "(--follow-symlinks names folders links may point into)")


def open_confined(path: str | Path, root: str | Path, policy: ReadPolicy, max_bytes: int | None = None,
                  cap_name: str = "source.max_image_bytes") -> BinaryIO:
    """Open ``path`` for reading after ``confine``; refuse a file over ``max_bytes`` (None: no cap).

    Raises:
        RefusedRead: see ``confine``; ``too_large`` over the cap (named ``cap_name`` in the reason).
    """
    if not is_local(path) and not isinstance(path, str):
        return _open_remote(path, root, max_bytes, cap_name)
    resolved = confine(path, root, policy)
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise RefusedRead(f"missing_image: {path}") from exc
    except OSError as exc:  # ELOOP: a link swapped in after confine; EACCES …
        raise RefusedRead(f"unreadable: {path}: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RefusedRead(f"not_a_regular_file: {path} is a {file_kind(info.st_mode)}")
        if info.st_nlink > 1 and not policy.allow_hard_links:
            raise RefusedRead(f"hard_link: {path} has {info.st_nlink} hard links; another name of the same file may "
                              "lie outside the input root, so it is not read (source.allow_hard_links: true reads it)")
        if max_bytes is not None and info.st_size > max_bytes:
            raise RefusedRead(f"too_large: {path} is {info.st_size} bytes, over {cap_name}={max_bytes}")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_confined(path: str | Path, root: str | Path, policy: ReadPolicy, max_bytes: int,
                  cap_name: str = "source.max_image_bytes") -> bytes:
    """All bytes of ``path`` (at most ``max_bytes``) after ``confine``; never blocks on a FIFO or device.

    Raises:
        RefusedRead: see ``open_confined``; also ``unreadable`` on an I/O error while reading.
    """
    with open_confined(path, root, policy, max_bytes, cap_name) as handle:
        try:
            size = _size(handle)
            data = handle.read(min(size, max_bytes) + 1)  # the size + 1: a file that grew since fstat shows
            if len(data) > size:  # it grew: read on up to the cap (rare: only a file being written to)
                data += handle.read(max_bytes + 1 - len(data))
        except OSError as exc:  # EISDIR, EIO …
            raise RefusedRead(f"unreadable: {path}: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise RefusedRead(f"too_large: {path} grew past {cap_name}={max_bytes} bytes while read")
    return data


def _size(handle: Any) -> int:
    """The size of an open file: ``fstat`` of a local one, the store's size of an fsspec object."""
    try:
        return os.fstat(handle.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        return int(getattr(handle, "size", 0) or 0)


def _confine_remote(path: Any, root: Any, max_bytes: int | None,
                    cap_name: str = "source.max_image_bytes") -> tuple[Any, int]:
    """``(path, size)`` of an object under a remote ``root`` (see the module docstring)."""
    if not inside(path, root):
        raise RefusedRead(f"outside_root: {path} is not a plain key under the input prefix {root}")
    try:
        info = path.fs.info(path.path)
    except FileNotFoundError as exc:
        raise RefusedRead(f"missing_image: {path}") from exc
    except OSError as exc:  # PermissionError (credentials), connection errors
        raise RefusedRead(f"unreadable: {path}: {exc}") from exc
    if info.get("type") != "file":
        raise RefusedRead(f"not_a_regular_file: {path} is a {info.get('type', 'special')} prefix, not an object")
    size = int(info.get("size") or 0)
    if max_bytes is not None and size > max_bytes:
        raise RefusedRead(f"too_large: {path} is {size} bytes, over {cap_name}={max_bytes}")
    return path, size


def _open_remote(path: Any, root: Any, max_bytes: int | None, cap_name: str) -> BinaryIO:
    _confine_remote(path, root, max_bytes, cap_name)
    try:
        return path.open("rb")
    except FileNotFoundError as exc:
        raise RefusedRead(f"missing_image: {path}") from exc
    except OSError as exc:
        raise RefusedRead(f"unreadable: {path}: {exc}") from exc
