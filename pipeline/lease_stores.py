"""Conditional writes on one object store, the few requests a lease needs (``pipeline.output_lease``).

Each store that can hold a lease has an adapter here, registered by its fsspec protocol in ``STORES``; the lease
logic itself is store-agnostic. An adapter speaks of a *version*: the token that names one write of an object
(the ETag on S3, the generation number on GCS), and maps its client's errors onto two exceptions:
``PreconditionFailed`` (the object exists / changed since that version) and ``ConditionsRefused`` (the store
rejects the conditional request itself). Anything else is raised as an ``OSError``.

- create only if absent: S3 ``PUT If-None-Match: *``; GCS upload ``ifGenerationMatch=0``;
- replace only version V: S3 ``PUT If-Match: V``; GCS upload ``ifGenerationMatch=V``;
- delete only version V: S3 ``DELETE If-Match: V`` (a plain delete where the store refuses it); GCS ``DELETE
  ifGenerationMatch=V``;
- read version, body and age: S3 ``GET`` (``ETag``, ``Date`` − ``Last-Modified``); GCS the object resource
  (``generation``, ``Date`` − ``updated``), then the media of that generation.

Ages are measured on the server's clock (its ``Date`` header against the object's modification time), never
against the local clock.
"""

from __future__ import annotations

import email.utils
import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, ClassVar, Protocol


class PreconditionFailed(Exception):
    """The object already exists (create) or is no longer the given version (replace, delete)."""


class ConditionsRefused(Exception):
    """The store rejected the conditional request itself (it does not implement the condition)."""


class LeaseStore(Protocol):
    """The conditional requests on one bucket that a lease is made of (see the module docstring)."""

    def put(self, key: str, body: bytes, version: str | None) -> str:
        """Write ``body`` to ``key`` if it is absent (``version`` None) or still ``version``; returns the new
        version. Raises ``PreconditionFailed`` / ``ConditionsRefused`` / ``OSError``."""

    def read(self, key: str) -> tuple[str, bytes, float] | None:
        """``(version, body, age_s on the server's clock)`` of ``key``, or None when it does not exist."""

    def delete(self, key: str, version: str | None) -> None:
        """Delete ``key`` if it is still ``version`` (None: whatever it holds). Raises ``PreconditionFailed``."""


def _age_s(date_header: str, modified: datetime) -> float:
    """Seconds between the object's modification and the server's ``Date`` (never negative)."""
    return max((email.utils.parsedate_to_datetime(date_header) - modified).total_seconds(), 0.0)


class S3Store:
    """``s3://`` through s3fs (botocore requests, so the conditions are botocore parameters)."""

    _REFUSED: ClassVar[set[str]] = {"NotImplemented", "InvalidArgument", "InvalidRequest"}
    _CONFLICT: ClassVar[set[str]] = {"PreconditionFailed", "ConditionalRequestConflict"}

    def __init__(self, fs: Any, bucket: str) -> None:
        self.fs, self.bucket = fs, bucket

    @staticmethod
    def _code(exc: BaseException) -> tuple[str, int]:
        """The S3 error code and HTTP status behind an s3fs ``OSError`` (its ``__cause__`` is botocore's)."""
        for err in (exc, exc.__cause__, exc.__context__):
            response = getattr(err, "response", None)
            if isinstance(response, dict):
                return (str(response.get("Error", {}).get("Code", "")),
                        int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0))
        return "", 0

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            code, status = self._code(exc)
            if code in self._CONFLICT or status in (409, 412) or isinstance(exc, FileExistsError):
                raise PreconditionFailed(str(exc)) from exc
            if code in self._REFUSED:
                raise ConditionsRefused(str(exc)) from exc
            raise

    def put(self, key: str, body: bytes, version: str | None) -> str:
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        with self._errors():
            return self.fs.call_s3("put_object", Bucket=self.bucket, Key=key, Body=body, **condition)["ETag"]

    def read(self, key: str) -> tuple[str, bytes, float] | None:
        from fsspec.asyn import sync

        async def get():
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=key)
            return response, await response["Body"].read()

        try:
            with self._errors():
                response, body = sync(self.fs.loop, get)
        except FileNotFoundError:
            return None
        return response["ETag"], body, _age_s(response["ResponseMetadata"]["HTTPHeaders"]["date"],
                                              response["LastModified"])

    def delete(self, key: str, version: str | None) -> None:
        if version is None:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=key)
            return
        try:
            with self._errors():
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=key, IfMatch=version)
        except (ConditionsRefused, OSError):  # a store refusing conditional deletes: the caller checked the version
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=key)


class GCSStore:
    """``gs://`` through gcsfs: raw JSON API requests (``fs._call``) carrying ``ifGenerationMatch``.

    gcsfs's own writes know only ``ifGenerationMatch=0`` (``mode="create"``), not a given generation, so the
    upload is a multipart upload (object resource + media in one request) made here.
    """

    _BOUNDARY = "umg-lease-boundary"

    def __init__(self, fs: Any, bucket: str) -> None:
        self.fs, self.bucket = fs, bucket

    def _call(self, *args: Any, **kwargs: Any) -> tuple[Any, bytes]:
        """``fs._call`` run on gcsfs's loop; 412 → ``PreconditionFailed``, 400/501 → ``ConditionsRefused``, other
        HTTP errors → ``OSError`` (404 stays ``FileNotFoundError``)."""
        from fsspec.asyn import sync
        from gcsfs.retry import HttpError

        try:
            return sync(self.fs.loop, self.fs._call, *args, **kwargs)
        except FileExistsError as exc:  # gcsfs raises it for 412 Precondition Failed
            raise PreconditionFailed(str(exc)) from exc
        except ValueError as exc:  # gcsfs: 400 "invalid ..."
            raise ConditionsRefused(str(exc)) from exc
        except HttpError as exc:
            if exc.code in (409, 412):
                raise PreconditionFailed(str(exc)) from exc
            if exc.code in (400, 501):
                raise ConditionsRefused(str(exc)) from exc
            raise OSError(f"gs://{self.bucket}: {exc}") from exc

    def put(self, key: str, body: bytes, version: str | None) -> str:
        resource = json.dumps({"name": key, "contentType": "application/json"})
        payload = (f"--{self._BOUNDARY}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{resource}\r\n"
                   f"--{self._BOUNDARY}\r\nContent-Type: application/json\r\n\r\n").encode() + body \
            + f"\r\n--{self._BOUNDARY}--".encode()
        _, content = self._call("POST", f"{self.fs._location}/upload/storage/v1/b/{{}}/o", self.bucket,
                                uploadType="multipart", ifGenerationMatch=version or "0", data=payload,
                                headers={"Content-Type": f'multipart/related; boundary="{self._BOUNDARY}"'})
        return str(json.loads(content)["generation"])

    def read(self, key: str) -> tuple[str, bytes, float] | None:
        try:
            headers, content = self._call("GET", "b/{}/o/{}", self.bucket, key)
            resource = json.loads(content)
            generation = str(resource["generation"])
            _, body = self._call("GET", "b/{}/o/{}", self.bucket, key, alt="media", generation=generation)
        except FileNotFoundError:  # absent, or replaced between the two requests (the caller looks again)
            return None
        updated = datetime.fromisoformat(resource["updated"].replace("Z", "+00:00"))
        return generation, body, _age_s(headers["Date"], updated)

    def delete(self, key: str, version: str | None) -> None:
        condition = {} if version is None else {"ifGenerationMatch": version}
        try:
            self._call("DELETE", "b/{}/o/{}", self.bucket, key, **condition)
        except FileNotFoundError:
            if version is not None:
                raise PreconditionFailed(f"gs://{self.bucket}/{key} is gone") from None


#: fsspec protocol -> adapter class; a protocol not listed here cannot be leased.
STORES: dict[str, Callable[[Any, str], LeaseStore]] = {"s3": S3Store, "s3a": S3Store, "gs": GCSStore,
                                                       "gcs": GCSStore}


def store_for(fs: Any, protocol: str, bucket: str) -> LeaseStore:
    """The adapter for ``protocol`` on ``bucket`` (KeyError when the protocol has none: see ``STORES``)."""
    return STORES[protocol](fs, bucket)


def new_body(owner: dict[str, Any], ttl_s: float) -> bytes:
    """A lease body: the owner, its TTL and a fresh nonce (so every write is a new version even where the
    version is a content hash)."""
    return json.dumps({**owner, "ttl_s": ttl_s, "nonce": uuid.uuid4().hex}).encode()
