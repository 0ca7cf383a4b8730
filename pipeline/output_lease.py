"""A lease on an object-store output: one build writes an ``s3://`` prefix at a time, and a killed one's claim expires.

A local output is locked with ``flock`` (``pipeline.shard_build.lock_build``); an object store has no such lock,
so two builds into one bucket prefix would interleave their shards. The lease is an object, ``OUT/_build.lease``,
written only with conditional requests, which S3 (since 2024), SeaweedFS and MinIO honour:

- **take**: ``PUT`` with ``If-None-Match: *`` creates it only if no lease exists;
- **renew**: the holder rewrites it every ``ttl_s / 3`` with ``If-Match: <its ETag>`` (the body holds a fresh
  nonce, so each write has a new ETag); a failed renewal means another build took it over (``lost``);
- **take over**: a lease not renewed for longer than its ``ttl_s`` (a killed build's) is replaced with
  ``If-Match: <the stale ETag>``, so of two builds taking over at once one wins. Its age is measured on the
  server's clock (the response's ``Date`` minus the object's ``Last-Modified``), never against the local clock;
- **release**: ``DELETE`` with ``If-Match: <its ETag>`` (a plain delete after checking the ETag where the store
  refuses conditional deletes).

The body names the holder (host, pid, start time, ``ttl_s``) for the refusal message. Before the first lease on
a bucket a probe object checks that the store refuses a second ``If-None-Match: *`` create; a store that ignores
the condition would let two builds in, so the build is refused with an error saying so — locking is never
skipped silently. Only ``s3://`` has conditional writes here; other object stores are refused the same way
(``unsupported``). The one way around the refusal is explicit: ``lock_output: false`` in the build config.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pipeline.shards import ShardError

log = logging.getLogger(__name__)

LEASE_NAME = "_build.lease"
S3_PROTOCOLS = ("s3", "s3a")
_PROBED: set[tuple[int, str]] = set()  # (filesystem, bucket) whose conditional writes were checked


def unsupported(build_dir: Any) -> str | None:
    """Why ``build_dir`` (a remote path) cannot be leased, or None when it can."""
    protocol = getattr(build_dir, "protocol", "")
    if protocol in S3_PROTOCOLS:
        return None
    return (f"output {build_dir}: builds into {protocol}:// outputs cannot be locked (the lease that keeps a second "
            f"build out needs conditional writes, implemented for s3:// only); write to s3:// or a local folder, or set "
            "lock_output: false if you make sure yourself that one build at a time writes there")


def _error_code(exc: BaseException) -> tuple[str, int]:
    """The S3 error code and HTTP status behind an s3fs ``OSError`` (its ``__cause__`` is botocore's error)."""
    for err in (exc, exc.__cause__, exc.__context__):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            return (str(response.get("Error", {}).get("Code", "")),
                    int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0))
    return "", 0


def _precondition_failed(exc: BaseException) -> bool:
    code, status = _error_code(exc)
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412) \
        or isinstance(exc, FileExistsError)


@dataclass
class Holder:
    """The lease as found: its ETag, body and age on the server's clock."""

    etag: str
    body: dict[str, Any]
    age_s: float

    @property
    def ttl_s(self) -> float:
        return float(self.body.get("ttl_s", 0) or 0)

    def describe(self) -> str:
        who = f"{self.body.get('host', '?')} pid {self.body.get('pid', '?')}"
        return (f"{who}, lease {LEASE_NAME} renewed {self.age_s:.0f} s ago; one not renewed for {self.ttl_s:.0f} s "
                "is taken over")


class ObjectLease:
    """The lease on one ``s3://`` output (see the module docstring); ``acquire`` once, ``release`` at the end."""

    def __init__(self, build_dir: Any, ttl_s: float, owner: dict[str, Any] | None = None,
                 heartbeat: bool = True) -> None:
        """``owner``: what the lease names (default host, pid, start time); ``heartbeat``: renew in a thread
        (False: only by calling ``renew``, e.g. to stand for a build that stalls)."""
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s must be > 0, got {ttl_s}")
        self.build_dir, self.ttl_s = build_dir, float(ttl_s)
        self.fs = build_dir.fs
        self.bucket, _, prefix = build_dir.path.partition("/")
        self.key = f"{prefix.rstrip('/')}/{LEASE_NAME}" if prefix.strip("/") else LEASE_NAME
        self.owner = owner or {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self.lost, self.heartbeat = False, heartbeat
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------- S3 requests
    def _call(self, method: str, **kwargs) -> dict[str, Any]:
        return self.fs.call_s3(method, Bucket=self.bucket, **kwargs)

    def _put(self, key: str | None = None, **condition) -> str:
        body = json.dumps({**self.owner, "ttl_s": self.ttl_s, "nonce": uuid.uuid4().hex}).encode()
        return self._call("put_object", Key=key or self.key, Body=body, **condition)["ETag"]

    def _read(self) -> Holder | None:
        """The current lease, or None when there is none."""
        from fsspec.asyn import sync

        async def get():
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            body = await response["Body"].read()
            return response, body

        try:
            response, raw = sync(self.fs.loop, get)
        except FileNotFoundError:
            return None
        now = email.utils.parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        return Holder(response["ETag"], body if isinstance(body, dict) else {},
                      max((now - response["LastModified"]).total_seconds(), 0.0))

    def _check_conditional_writes(self) -> None:
        """Refuse a store that ignores ``If-None-Match: *`` (once per filesystem and bucket)."""
        if (id(self.fs), self.bucket) in _PROBED:
            return
        probe = f"{self.key}.probe-{uuid.uuid4().hex[:12]}"
        refusal = (f"output {self.build_dir}: the object store does not honour conditional writes "
                   f"(PUT If-None-Match: *), so no lease can keep a second build out; use a store that does "
                   f"(S3, SeaweedFS, MinIO) or a local output, or set lock_output: false if you make sure yourself "
                   f"that one build at a time writes there")
        try:
            self._put(probe, IfNoneMatch="*")
            try:
                self._put(probe, IfNoneMatch="*")
            except OSError as exc:
                if not _precondition_failed(exc):
                    raise ShardError(f"{refusal} ({exc})") from exc
            else:
                raise ShardError(refusal)
        except OSError as exc:
            code, _ = _error_code(exc)
            if code in ("NotImplemented", "InvalidArgument", "InvalidRequest") or _precondition_failed(exc):
                raise ShardError(f"{refusal} ({exc})") from exc
            raise ShardError(f"output {self.build_dir} is not writable: {exc}") from exc
        finally:
            try:
                self._call("delete_object", Key=probe)
            except OSError:
                pass
        _PROBED.add((id(self.fs), self.bucket))

    # -------------------------------------------------------------------------------------------- the lease
    def acquire(self) -> None:
        """Take the lease (or a stale one over) and keep renewing it in a daemon thread.

        Raises:
            ShardError: another build holds a live lease (its host and pid are named), or the store cannot
                lease (no conditional writes).
        """
        self._check_conditional_writes()
        for _ in range(5):  # a lease released or renewed between two requests: look again
            try:
                self._etag = self._put(IfNoneMatch="*")
                break
            except OSError as exc:
                if not _precondition_failed(exc):
                    raise ShardError(f"output {self.build_dir} is not writable: {exc}") from exc
            holder = self._read()
            if holder is None:
                continue
            if holder.age_s <= holder.ttl_s:
                raise ShardError(f"output {self.build_dir} is being written by another build ({holder.describe()}); "
                                 "wait for it to finish or choose another output")
            try:
                self._etag = self._put(IfMatch=holder.etag)
            except OSError as exc:
                if _precondition_failed(exc):
                    continue  # renewed, released or taken over by another build meanwhile
                raise ShardError(f"output {self.build_dir} is not writable: {exc}") from exc
            log.warning("output %s: took over the lease of a build that stopped renewing it (%s)", self.build_dir,
                        holder.describe())
            break
        else:
            raise ShardError(f"output {self.build_dir}: its lease {LEASE_NAME} kept changing while this build tried "
                             "to take it; is another build starting into it?")
        if self.heartbeat:
            self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.key}", daemon=True)
            self._thread.start()

    def renew(self) -> bool:
        """Rewrite the lease (``If-Match`` its ETag); False, and ``lost`` set, when another build took it over."""
        with self._lock:
            if self.lost or self._etag is None:
                return False
            try:
                self._etag = self._put(IfMatch=self._etag)
                return True
            except OSError as exc:
                if not _precondition_failed(exc):
                    log.warning("output %s: renewing its lease failed (%s); trying again", self.build_dir, exc)
                    return True
                self.lost = True
        log.error("output %s: another build took over this build's lease (this one did not renew it for %.0f s); "
                  "the output may hold shards of both", self.build_dir, self.ttl_s)
        return False

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            if not self.renew():
                return

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still this build's.

        Raises:
            ShardError: the lease was lost while the build ran (another build took it over).
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            etag, self._etag = self._etag, None
            if self.lost:
                raise ShardError(f"output {self.build_dir}: another build took over its lease while this build ran "
                                 f"(not renewed for {self.ttl_s:.0f} s); the output may hold shards of both: check "
                                 "it with `umg validate` and rerun one build")
            if etag is None:
                return
            try:
                self._call("delete_object", Key=self.key, IfMatch=etag)
            except OSError as exc:
                if _precondition_failed(exc):
                    return  # no longer ours
                holder = self._read()  # a store refusing conditional deletes: check, then delete
                if holder is not None and holder.etag == etag:
                    self._call("delete_object", Key=self.key)
