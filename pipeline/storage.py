"""Storage locations: local paths and URLs (``s3://``, ``gs://``, ``file://`` …) through fsspec.

Storage is a URL at the edges (``--input``, ``--output``, ``umg train --shards`` …). ``as_path`` turns one into
the object the code inside handles: a plain path or a ``file://`` URL becomes a ``pathlib.Path``, any other URL
a ``upath.UPath`` (universal_pathlib: the pathlib API over an fsspec filesystem, ``s3fs`` for ``s3://``,
``gcsfs`` for ``gs://``). Code past the edge uses what both share (``/``, ``name``, ``open``, ``exists``,
``iterdir``, ``unlink``, ``read_bytes`` …) and asks ``is_local`` where an object store differs: it has no
rename, no symlinks and no fsync — a PUT makes one object appear whole, so a file is written under its final
name, and several files become visible one after another (``publish``).

Credentials and endpoints come from where fsspec and the cloud SDKs look for them, never from our config
files: for S3 ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or ``~/.aws/credentials``, an instance role),
``AWS_ENDPOINT_URL`` for an S3-compatible server (SeaweedFS, MinIO), or fsspec's own configuration
(``FSSPEC_S3_ENDPOINT_URL``, ``~/.config/fsspec/*.json``); for GCS ``GOOGLE_APPLICATION_CREDENTIALS``, and for
a GCS emulator ``STORAGE_EMULATOR_HOST`` (with ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``: see
``flows.object_store``).
A URL is printed and stored as given (``s3://bucket/prefix``), which holds no secret.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Union

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
#: Protocols whose listings fsspec would cache per process: off, so a driver sees what other nodes wrote.
_LISTING_CACHED = {"s3", "s3a", "gs", "gcs", "abfs", "az"}

StoragePath = Union[Path, Any]  # pathlib.Path or upath.UPath (Any: upath is imported lazily)


class StorageError(ValueError):
    """A location that cannot be opened: unknown protocol or its fsspec package missing (names the package)."""


def scheme(location: str | os.PathLike) -> str:
    """The URL scheme of ``location`` (``"s3"``), or ``""`` for a plain path."""
    if isinstance(location, Path):
        return ""
    match = _SCHEME.match(str(location))
    return match.group(1).lower() if match else ""


def is_url(location: str | os.PathLike | Any) -> bool:
    """True for a location on a remote filesystem (``s3://`` …); a plain path or ``file://`` URL is local."""
    if isinstance(location, Path):
        return False
    return scheme(str(location)) not in ("", "file", "local")


def as_path(location: str | os.PathLike | Any) -> StoragePath:
    """``Path`` for a local location (plain path, ``file://``), ``UPath`` for a remote URL (see module doc).

    Raises:
        StorageError: the URL's protocol has no fsspec implementation installed (names the package to install).
    """
    if isinstance(location, Path):
        return location
    if not isinstance(location, str) and hasattr(location, "protocol"):  # already a UPath
        return location if location.protocol not in ("", "file", "local") else Path(location.path)
    text = str(location)
    proto = scheme(text)
    if proto in ("file", "local"):
        return Path(text.split("://", 1)[1] or "/")
    if not proto:
        return Path(text)
    from upath import UPath

    options = {"use_listings_cache": False} if proto in _LISTING_CACHED else {}
    try:
        path = UPath(text.rstrip("/") if text.rstrip("/") != f"{proto}:/" else text, **options)
        path.fs  # noqa: B018 - creates the filesystem now, so a missing package is reported here
    except (ImportError, ValueError) as exc:
        raise StorageError(f"{text}: no filesystem for {proto}:// ({exc}); install its fsspec package "
                           "(s3fs for s3://, gcsfs for gs://: pip install 'umg-clip[gcs]')") from exc
    return path


def is_local(path: StoragePath) -> bool:
    return isinstance(path, Path)


def names_in(folder: StoragePath) -> list[str]:
    """Names of the entries directly in ``folder`` (files and sub-folders), sorted; ``[]`` if it does not exist.

    One listing call (paginated on object stores), so it costs the same whatever is asked afterwards.
    """
    if is_local(folder):
        try:
            return sorted(os.listdir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return []
    try:
        entries = folder.fs.ls(folder.path, detail=False)
    except FileNotFoundError:
        return []
    prefix = folder.path.rstrip("/") + "/"
    return sorted(e[len(prefix):] for e in (x.rstrip("/") for x in entries) if e.startswith(prefix))


def find_files(folder: StoragePath) -> list[str]:
    """Relative posix paths of every object below a remote ``folder`` (recursive listing; local: use os.walk)."""
    prefix = folder.path.rstrip("/") + "/"
    try:
        found = folder.fs.find(folder.path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(key[len(prefix):] for key in found if key.startswith(prefix))


def inside(path: StoragePath, root: StoragePath) -> bool:
    """Whether a remote ``path`` names an object under ``root`` with no ``.``, ``..`` or empty segments.

    Object stores treat ``..`` as a literal key segment, but HTTP clients and gateways may collapse it; a key
    that only normalisation would keep inside the prefix is refused.
    """
    if getattr(path, "protocol", None) != getattr(root, "protocol", None):
        return False
    key, base = path.path, root.path.rstrip("/")
    if posixpath.normpath(key) != key or "//" in key:
        return False
    return key.startswith(base + "/")


def staging_dir(target_folder: StoragePath) -> tuple[Path, bool]:
    """A local folder to write files in before ``publish``: the target itself when local (a rename there is
    atomic), else a new temp folder. Returns ``(folder, made)``; remove a made one when done."""
    if is_local(target_folder):
        target_folder.mkdir(parents=True, exist_ok=True)
        return target_folder, False
    return Path(tempfile.mkdtemp(prefix="umg-stage-")), True


def publish(staged: Path, target: StoragePath, fsync: bool = True) -> None:
    """Make the finished local file ``staged`` appear as ``target``, whole: a rename (after fsync) on a local
    disk, an upload on an object store (a PUT / multipart upload shows the object only once complete)."""
    if is_local(target):
        if fsync:
            with open(staged, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(staged, target)
        return
    target.fs.put_file(str(staged), target.path)
    staged.unlink(missing_ok=True)


def write_bytes_whole(target: StoragePath, data: bytes) -> None:
    """Write ``data`` so a reader sees the old file or the new one, never a part (temp + rename, or one PUT)."""
    if is_local(target):
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(data)
        publish(tmp, target)
    else:
        target.fs.pipe_file(target.path, data)

