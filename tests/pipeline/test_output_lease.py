"""The lease on an object-store output (``pipeline.output_lease``), on each real server of the tests
(``store_bucket``): ``s3://`` on SeaweedFS, ``gs://`` on fake-gcs-server.

Issue 20 class 5: two builds into one bucket prefix; the second is refused at once, naming the holder; a killed
build's lease is taken over once it has not been renewed for its TTL; a build whose lease was taken over finds out.
Ages are read on the server's clock; the tests wait for a lease to be stale by polling, never by sleeping a fixed
time, and never depend on a heartbeat arriving in time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from typer.testing import CliRunner

from flows.cli import app
from pipeline.output_lease import LEASE_NAME, ObjectLease
from pipeline.shard_build import lock_build, release_build
from pipeline.shards import ShardError
from pipeline.storage import as_path, names_in


def _holder(out: str, ttl_s: float, then: str) -> subprocess.Popen:
    """Another build, in its own process: takes the lease on ``out`` (``lock_build``), prints ``locked``, then
    runs ``then``."""
    code = textwrap.dedent(f"""
        import os, signal, time
        from pipeline.shard_build import lock_build
        from pipeline.storage import as_path
        lock_build(as_path({out!r}), {ttl_s})
        print("locked", flush=True)
        {then}
        """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _one_image_folder(folder):
    from PIL import Image

    folder.mkdir()
    Image.new("RGB", (32, 24)).save(folder / "a.jpg")
    return folder


def _wait_stale(out: str, ttl_s: float, timeout_s: float = 60.0) -> None:
    """Until the lease on ``out`` was last written more than ``ttl_s`` ago (server clock)."""
    probe = ObjectLease(as_path(out), ttl_s, heartbeat=False)
    deadline = time.monotonic() + timeout_s
    while (holder := probe._read()) is not None and holder.age_s <= holder.ttl_s:
        assert time.monotonic() < deadline, "the lease never went stale"
        time.sleep(0.25)


def test_a_second_build_is_refused_at_once_naming_the_holder(store_bucket, tmp_path):
    out = f"{store_bucket[0]}/shards"
    holder = _holder(out, 60, "time.sleep(120)")
    try:
        with pytest.raises(ShardError, match=rf"being written by another build \(\S+ pid {holder.pid}, lease "):
            lock_build(as_path(out))
        result = CliRunner().invoke(app, ["build", "--input", str(_one_image_folder(tmp_path / "in")), "--output", out])
        assert result.exit_code != 0
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: output {out} is being written by another build")
    finally:
        holder.kill()
        holder.wait()
    assert LEASE_NAME in names_in(as_path(out))  # SIGKILL: nothing released it


def test_a_killed_builds_lease_is_taken_over_after_its_ttl(store_bucket):
    out = f"{store_bucket[0]}/shards"
    holder = _holder(out, 1.0, "os.kill(os.getpid(), signal.SIGKILL)")
    holder.wait()
    _wait_stale(out, 1.0)
    lock_build(as_path(out), 30)  # the stale lease is taken over
    try:
        body = json.loads(as_path(out).joinpath(LEASE_NAME).read_bytes())
        assert body["pid"] == os.getpid() and body["ttl_s"] == 30
    finally:
        release_build(as_path(out))
    assert LEASE_NAME not in names_in(as_path(out))  # released: the next build takes it at once
    lock_build(as_path(out))
    release_build(as_path(out))


def test_a_build_that_exits_on_an_error_releases_its_lease(store_bucket):
    out = f"{store_bucket[0]}/shards"
    holder = _holder(out, 60, "raise SystemExit(2)")  # e.g. `umg build` stopping with an error: line
    assert holder.wait() == 2
    assert LEASE_NAME not in names_in(as_path(out))  # released at exit: the rerun need not wait out the TTL


def test_a_running_build_renews_its_lease_and_a_stalled_one_learns_it_was_taken_over(store_bucket):
    running = ObjectLease(as_path(f"{store_bucket[0]}/running"), 0.6)  # renewed every 0.2 s by its thread
    running.acquire()
    version, deadline = running._version, time.monotonic() + 60
    while running._version == version:  # each renewal is a new object version
        assert time.monotonic() < deadline, "the lease was never renewed"
        time.sleep(0.05)
    running.release()
    out = as_path(f"{store_bucket[0]}/shards")
    first = ObjectLease(out, 1.0, owner={"host": "a", "pid": 1}, heartbeat=False)
    first.acquire()
    _wait_stale(str(out), 1.0)  # ``first`` stalls past its TTL
    second = ObjectLease(out, 60.0, owner={"host": "b", "pid": 2}, heartbeat=False)
    second.acquire()
    assert not first.renew() and first.lost  # its conditional rewrite fails: it knows
    with pytest.raises(ShardError, match="another build took over its lease"):
        first.release()
    assert LEASE_NAME in names_in(out)  # the loser did not delete the winner's lease
    second.release()
    assert LEASE_NAME not in names_in(out)


def test_outputs_without_conditional_writes_are_refused_unless_locking_is_turned_off_explicitly(tmp_path):
    with pytest.raises(ShardError, match=r"memory:// outputs cannot be locked .* for gs://, s3:// only"):
        lock_build(as_path("memory://bucket/out"))
    args = ["build", "--input", str(_one_image_folder(tmp_path / "in")), "--output", "memory://bucket/out"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and refused.output.startswith("error: output memory://bucket/out: builds into")
    done = CliRunner().invoke(app, [*args, "--set", "lock_output=false"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output.strip().splitlines()[-1])["inputs"] == 1
