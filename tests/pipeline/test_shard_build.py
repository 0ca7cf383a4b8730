"""Building shards from a source: resume, exactly-once after kill -9, error rows, plan pinning."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_schemas import ImageLimits
from pipeline.shard_build import build_shards
from pipeline.shards import ShardError, finished_shards, read_shard_rows
from pipeline.sources.folder import FolderSource
from pipeline.validate import validate_build

N_IMAGES = 23
SHARD_SIZE = 5


def _image_folder(root: Path, n: int = N_IMAGES) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 255, size=(24 + i, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img_{i:03d}.png")
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("not an image")
    return root


def _source_ids_in_build(build_dir: Path) -> Counter:
    return Counter(row["source_id"] for name in finished_shards(build_dir) for row in read_shard_rows(build_dir, name))


def test_every_input_once_with_bad_inputs_as_error_rows(tmp_path):
    source = FolderSource(_image_folder(tmp_path / "in"))
    summary = build_shards(source, tmp_path / "out", SHARD_SIZE, ImageLimits())
    assert summary.planned == len(summary.written) == 5  # 25 inputs / 5
    seen = _source_ids_in_build(tmp_path / "out")
    assert seen == Counter(source.list_refs())
    rows = {row["source_id"]: row for name in finished_shards(tmp_path / "out")
            for row in read_shard_rows(tmp_path / "out", name)}
    assert rows["zero.jpg"]["error"].startswith("empty")
    assert rows["text.jpg"]["error"].startswith("not_an_image")
    assert sum(row["status"] == "ok" for row in rows.values()) == N_IMAGES
    assert validate_build(tmp_path / "out").ok

    again = build_shards(source, tmp_path / "out", SHARD_SIZE, ImageLimits())
    assert again.written == [] and len(again.skipped) == 5


def test_rerun_with_other_shard_size_is_refused(tmp_path):
    source = FolderSource(_image_folder(tmp_path / "in", n=3))
    build_shards(source, tmp_path / "out", 2, ImageLimits())
    with pytest.raises(ShardError, match="different plan"):
        build_shards(source, tmp_path / "out", 3, ImageLimits())


KILLABLE_BUILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from data_schemas import ImageLimits
    from pipeline import shards
    from pipeline.shard_build import build_shards
    from pipeline.sources.folder import FolderSource

    src, out, marker = map(Path, sys.argv[1:4])
    original_write = shards.ShardWriter.write
    def slow_write(self, record, jpg, notes=None):
        done = original_write(self, record, jpg, notes)
        if self.name == "00002" and len(self.rows) == 3:
            self._tar.fileobj.flush()
            marker.write_text("mid-shard")
            time.sleep(60)
        return done
    shards.ShardWriter.write = slow_write
    build_shards(FolderSource(src), out, int(sys.argv[4]), ImageLimits())
    """
)


def test_kill_9_mid_shard_then_rerun_gives_every_input_exactly_once(tmp_path):
    source_dir = _image_folder(tmp_path / "in")
    out, marker = tmp_path / "out", tmp_path / "marker"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLABLE_BUILD, str(source_dir), str(out), str(marker), str(SHARD_SIZE)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, "build exited before reaching the kill point"
            assert time.monotonic() < deadline, "build never reached shard 00002"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Killed inside shard 00002: two shards finished, the third only as temp files; no partial tar visible.
    assert finished_shards(out) == ["00000", "00001"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert list(out.glob("*.tar.tmp")), "the killed writer should have left a temp tar"

    summary = build_shards(FolderSource(source_dir), out, SHARD_SIZE, ImageLimits())
    assert summary.skipped == ["00000", "00001"]
    assert _source_ids_in_build(out) == Counter(FolderSource(source_dir).list_refs())
    assert not list(out.glob("*.tmp"))
    report = validate_build(out)
    assert report.ok, report.problems
    assert (report.inputs, report.samples) == (N_IMAGES + 2, N_IMAGES)


def test_output_removed_mid_build_stops_it_and_the_rerun_starts_again(tmp_path):
    """Issue 20 class 5: the output folder removed between shards; the writer must not recreate it as a folder
    that is no build (which the next run would refuse): the build stops, the rerun writes every input once."""
    import shutil

    source = FolderSource(_image_folder(tmp_path / "in", n=8))
    out = tmp_path / "out"
    with pytest.raises(ShardError, match="lost its _plan.json"):
        build_shards(source, out, SHARD_SIZE, ImageLimits(), on_shard=lambda stats: shutil.rmtree(out))
    assert not out.exists()
    build_shards(source, out, SHARD_SIZE, ImageLimits())
    assert _source_ids_in_build(out) == Counter(source.list_refs())


def test_a_second_build_into_one_output_is_refused_and_a_killed_one_leaves_no_stale_lock(tmp_path):
    """Issue 20 class 5: two builds into one output; the second is refused at once (flock on OUT/_build.lock),
    and once the first process dies (SIGKILL: no cleanup ran) the next build proceeds."""
    source = FolderSource(_image_folder(tmp_path / "in", n=4))
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(out / "_build.lock")!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, str(os.getpid()).encode())
        print("locked", flush=True)
        time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ShardError, match=rf"being written by another build \(pid {holder.pid}\)"):
            build_shards(source, out, SHARD_SIZE, ImageLimits())
    finally:
        holder.kill()
        holder.wait()
    summary = build_shards(source, out, SHARD_SIZE, ImageLimits())
    assert len(summary.written) == 2 and _source_ids_in_build(out) == Counter(source.list_refs())
