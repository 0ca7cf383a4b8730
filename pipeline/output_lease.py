"""A lease on an object-store output: one build writes an ``s3://`` or ``gs://`` prefix at a time, and a killed
one's claim expires.

A local output is locked with ``flock`` (``pipeline.shard_build.lock_build``); an object store has no such lock,
so two builds into one bucket prefix would interleave their shards. The lease is an object, ``OUT/_build.lease``,
written only with conditional requests (``pipeline.lease_stores``: ``If-None-Match`` / ``If-Match`` on S3 — S3
since 2024, SeaweedFS, MinIO —, ``ifGenerationMatch`` on GCS):

- **take**: create it only if no lease exists (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``);
- **renew**: the holder rewrites it every ``ttl_s / 3`` only if it is still the version it wrote (S3 ``If-Match:
  <ETag>``, GCS ``ifGenerationMatch=<generation>``; the body holds a fresh nonce, so each write is a new
  version); a failed renewal means another build took it over (``lost``);
- **take over**: a lease not renewed for longer than its ``ttl_s`` (a killed build's) is replaced on the same
  condition, naming the stale version, so of two builds taking over at once one wins. Its age is measured on
  the server's clock (the response's ``Date`` minus the object's modification time), never the local clock;
- **release**: delete it if it is still this build's version (checked, then a conditional delete).

The body names the holder (host, pid, start time, ``ttl_s``) for the refusal message. Before the first lease on
a bucket a probe object checks that the store refuses a second create-if-absent; a store that ignores the
condition would let two builds in, so the build is refused with an error saying so — locking is never skipped
silently. Protocols without an adapter in ``pipeline.lease_stores.STORES`` are refused the same way
(``unsupported``). The one way around the refusal is explicit: ``lock_output: false`` in the build config.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pipeline.lease_stores import STORES, ConditionsRefused, PreconditionFailed, new_body, store_for
from pipeline.shards import ShardError

log = logging.getLogger(__name__)

LEASE_NAME = "_build.lease"
_PROBED: set[tuple[int, str]] = set()  # (filesystem, bucket) whose conditional writes were checked


def unsupported(build_dir: Any) -> str | None:
    """Why ``build_dir`` (a remote path) cannot be leased, or None when it can."""
    protocol = getattr(build_dir, "protocol", "")
    if protocol in STORES:
        return None
    leasable = ", ".join(sorted({f"{name}://" for name in STORES} - {"s3a://", "gcs://"}))
    return (f"output {build_dir}: builds into {protocol}:// outputs cannot be locked (the lease that keeps a second "
            f"build out needs conditional writes, implemented for {leasable} only); write to one of those or a "
            "local folder, or set lock_output: false if you make sure yourself that one build at a time writes there")


@dataclass
class Holder:
    """The lease as found: its version (S3 ETag, GCS generation), body and age on the server's clock."""

    version: str
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
    """The lease on one object-store output (see the module docstring); ``acquire`` once, ``release`` at the end."""

    def __init__(self, build_dir: Any, ttl_s: float, owner: dict[str, Any] | None = None,
                 heartbeat: bool = True) -> None:
        """``owner``: what the lease names (default host, pid, start time); ``heartbeat``: renew in a thread
        (False: only by calling ``renew``, e.g. to stand for a build that stalls)."""
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s must be > 0, got {ttl_s}")
        self.build_dir, self.ttl_s = build_dir, float(ttl_s)
        self.fs = build_dir.fs
        self.bucket, _, prefix = build_dir.path.partition("/")
        self.store = store_for(self.fs, build_dir.protocol, self.bucket)
        self.key = f"{prefix.rstrip('/')}/{LEASE_NAME}" if prefix.strip("/") else LEASE_NAME
        self.owner = owner or {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self.lost, self.heartbeat = False, heartbeat
        self._version: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -------------------------------------------------------------------------------------------- requests
    def _put(self, version: str | None, key: str | None = None) -> str:
        """Write a fresh body: create (``version`` None) or replace ``version``; returns the new version."""
        return self.store.put(key or self.key, new_body(self.owner, self.ttl_s), version)

    def _read(self) -> Holder | None:
        """The current lease, or None when there is none."""
        found = self.store.read(self.key)
        if found is None:
            return None
        version, raw, age_s = found
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        return Holder(version, body if isinstance(body, dict) else {}, age_s)

    def _check_conditional_writes(self) -> None:
        """Refuse a store that ignores create-if-absent (once per filesystem and bucket)."""
        if (id(self.fs), self.bucket) in _PROBED:
            return
        probe = f"{self.key}.probe-{uuid.uuid4().hex[:12]}"
        refusal = (f"output {self.build_dir}: the object store does not honour conditional writes (create only if "
                   f"absent: S3 If-None-Match: *, GCS ifGenerationMatch=0), so no lease can keep a second build out; "
                   f"use a store that does (S3, SeaweedFS, MinIO, GCS) or a local output, or set lock_output: false "
                   f"if you make sure yourself that one build at a time writes there")
        try:
            self._put(None, probe)
            try:
                self._put(None, probe)
            except PreconditionFailed:
                pass
            else:
                raise ShardError(refusal)
        except (ConditionsRefused, PreconditionFailed) as exc:
            raise ShardError(f"{refusal} ({exc})") from exc
        except OSError as exc:
            raise ShardError(f"output {self.build_dir} is not writable: {exc}") from exc
        finally:
            try:
                self.store.delete(probe, None)
            except (OSError, PreconditionFailed):
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
                self._version = self._put(None)
                break
            except PreconditionFailed:
                pass
            except (OSError, ConditionsRefused) as exc:
                raise ShardError(f"output {self.build_dir} is not writable: {exc}") from exc
            holder = self._read()
            if holder is None:
                continue
            if holder.age_s <= holder.ttl_s:
                raise ShardError(f"output {self.build_dir} is being written by another build ({holder.describe()}); "
                                 "wait for it to finish or choose another output")
            try:
                self._version = self._put(holder.version)
            except PreconditionFailed:
                continue  # renewed, released or taken over by another build meanwhile
            except (OSError, ConditionsRefused) as exc:
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
        """Rewrite the lease if it is still the version this build wrote; False, and ``lost`` set, when another
        build took it over."""
        with self._lock:
            if self.lost or self._version is None:
                return False
            try:
                self._version = self._put(self._version)
                return True
            except PreconditionFailed:
                self.lost = True
            except (OSError, ConditionsRefused) as exc:
                log.warning("output %s: renewing its lease failed (%s); trying again", self.build_dir, exc)
                return True
        log.error("output %s: another build took over this build's lease (this one did not renew it for %.0f s); "
                  "the output may hold shards of both", self.build_dir, self.ttl_s)
        return False

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            if not self.renew():
                return

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still this build's: its version is checked first, then
        deleted on that condition (a store that ignores the condition on deletes still deletes only after the
        check).

        Raises:
            ShardError: the lease was lost while the build ran (another build took it over).
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            version, self._version = self._version, None
            if self.lost:
                raise ShardError(f"output {self.build_dir}: another build took over its lease while this build ran "
                                 f"(not renewed for {self.ttl_s:.0f} s); the output may hold shards of both: check "
                                 "it with `umg validate` and rerun one build")
            if version is None:
                return
            holder = self._read()
            if holder is None or holder.version != version:
                return  # no longer ours
            try:
                self.store.delete(self.key, version)
            except PreconditionFailed:
                return  # taken over between the check and the delete
