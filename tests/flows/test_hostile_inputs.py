"""The hostile-input corpus (issue 12) through `umg build --config configs/smoke.yaml`, one run per source kind.

Each run is a subprocess under an address-space limit (``RLIMIT_AS``). Asserted for every kind: exit 0;
exactly one row per input the source enumerates, each with the expected status / reason; no byte of a
file outside the input root in the output; nothing written outside OUT. The folder corpus runs the full
smoke chain of tiny models; the other kinds run with ``annotate=null`` (the sources and ingest are what
they exercise) so the whole test stays well under a minute.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_schemas import load_config
from pipeline.shards import finished_shards, iter_samples, read_shard_rows
from pipeline.sources.registry import build_source
from hostile_corpus import (
    MAX_IMAGE_BYTES,
    SECRET,
    Expect,
    jpeg,
    run_faults,
    coco_corpus,
    folder_corpus,
    tar_corpus,
    vg_corpus,
    write_outside,
)

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
# torch (CUDA build) maps ~3.2 GB of address space on import; the tiny model chain needs ~4.7 GB in all,
# while its resident memory stays near 1.3 GB. A 22 GB polygon allocation fails either limit at once.
LIMIT_NO_MODELS = 4 * 2**30
LIMIT_SMOKE_CHAIN = 5 * 2**30
CORPORA: list[tuple[str, Callable[[Path, Path], list[Expect]], bool]] = [
    ("folder", folder_corpus, True),
    ("img2dataset", tar_corpus, False),
    ("coco", coco_corpus, False),
    ("vg", vg_corpus, False),
]


@pytest.fixture(autouse=True)
def _needs_fifos():
    if not hasattr(os, "mkfifo"):
        pytest.skip("the corpus needs FIFOs (POSIX)")


def _snapshot(base: Path) -> dict[str, tuple]:
    """relative path -> (mode, size, mtime) of everything under ``base`` (links not followed)."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            info = (Path(dirpath) / name).lstat()
            seen[str((Path(dirpath) / name).relative_to(base))] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return seen


def _run_build(source_root: Path, out: Path, cwd: Path, tiny: Path, with_models: bool) -> subprocess.CompletedProcess:
    limit = LIMIT_SMOKE_CHAIN if with_models else LIMIT_NO_MODELS
    args = [sys.executable, "-m", "flows.cli", "build", "--config", str(SMOKE), "--input", str(source_root),
            "--output", str(out), "--set", f"annotate.tiny_models_dir={tiny}",
            "--set", f"source.max_image_bytes={MAX_IMAGE_BYTES}", *([] if with_models else ["--set", "annotate=null"])]
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)),
    )


def _rows(out: Path) -> list[dict]:
    return [row for name in finished_shards(out) for row in read_shard_rows(out, name)]


def _status(row: dict) -> str:
    return "ok" if row["status"] == "ok" else (row["error"] or "").split(":", 1)[0]


def _leaks(out: Path, outside_files: dict[str, bytes]) -> list[str]:
    """Outside files whose content shows up in any output file, a shard row or a stored sample."""
    blobs = [p.read_bytes() for p in out.rglob("*") if p.is_file()]
    blobs += [json.dumps(pq.read_table(p).to_pylist(), default=str).encode() for p in out.glob("*.parquet")]
    blobs += [data for sample in iter_samples(out) for data in sample.members.values()]
    return sorted(name for name, content in outside_files.items() if any(content in blob for blob in blobs))


def test_hostile_corpus_is_fully_accounted_for_and_confined(tmp_path, tmp_path_factory):
    base = tmp_path / "corpus"
    outside_files = write_outside(base / "outside")
    assert SECRET in outside_files.values()
    cwd, tiny = base / "cwd", tmp_path_factory.mktemp("tiny_models")
    cwd.mkdir()
    roots = {kind: base / kind for kind, _, _ in CORPORA}
    expected = {kind: builder(roots[kind], base / "outside") for kind, builder, _ in CORPORA}
    outs = {kind: tmp_path / f"out_{kind}" for kind in roots}
    before = _snapshot(base)

    tried = accounted = crashed = lost = leaked = tracebacks = 0
    problems: list[str] = []
    for kind, _, with_models in CORPORA:
        wanted = expected[kind]
        tried += len(wanted)
        result = _run_build(roots[kind], outs[kind], cwd, tiny, with_models)
        if "Traceback" in result.stderr:
            tracebacks += 1
            problems.append(f"{kind}: a traceback on stderr: {result.stderr[-3000:]}")
        if result.returncode != 0:
            crashed += len(wanted)
            problems.append(f"{kind}: exit {result.returncode}: {result.stderr[-3000:]}")
            continue
        refs = build_source(load_config(SMOKE, [f"source.path={roots[kind]}"]).source).list_refs()
        rows = _rows(outs[kind])
        if len(rows) != len(refs) or len(refs) != len(wanted):
            problems.append(f"{kind}: {len(rows)} rows, {len(refs)} refs enumerated, {len(wanted)} inputs in corpus")
        by_id: dict[str, list[dict]] = {}
        for row in rows:
            by_id.setdefault(row["source_id"], []).append(row)
        for want in wanted:
            got = by_id.get(want.source_id, [])
            if not got:
                lost += 1
                problems.append(f"{kind}: no row for {want.source_id!r}")
            elif len(got) == 1 and _status(got[0]) == want.status and (want.note or "") in (got[0]["notes"] or ""):
                accounted += 1
            else:
                problems.append(f"{kind}: {want.source_id!r} expected {want.status} "
                                f"(note {want.note!r}), got {[(r['status'], r['error'], r['notes']) for r in got]}")
        leaks = _leaks(outs[kind], outside_files)
        leaked += len(leaks)
        problems += [f"{kind}: bytes of outside file {name} in the output" for name in leaks]

    after = _snapshot(base)
    if after != before:
        changed = sorted(set(after.items()) ^ set(before.items()))
        problems.append(f"files written or changed outside OUT: {changed[:10]}")
    counts = (f"{tried} tried, {accounted} accounted, {crashed} crashed, {lost} lost, {leaked} read outside the root, "
              f"{tracebacks} tracebacks")
    print(counts)
    assert not problems, "\n".join([counts, *problems])
    assert counts == f"{tried} tried, {tried} accounted, 0 crashed, 0 lost, 0 read outside the root, 0 tracebacks"


def _one_line_error(result, secret: bytes) -> str | None:
    """None when ``result`` (a CliRunner result) is one ``error:`` line, exit 2, no traceback, no secret; else why."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return f"traceback: {type(result.exception).__name__}: {result.exception}"
    lines = result.output.strip().splitlines()
    if result.exit_code == 0 or len(lines) != 1 or not lines[0].startswith("error: "):
        return f"exit {result.exit_code}, output {result.output!r}"
    if secret.decode() in result.output:
        return "the error line shows bytes of a file outside the root"
    return None


def test_run_level_faults_end_in_one_error_line(tmp_path):
    """Issue 20 class 5 (and class 4's links to annotation files): each fault ends in one ``error:`` line naming
    it, exit 2, no traceback, nothing read from outside the root; a disk filling up mid-build (RLIMIT_FSIZE)
    ends the same way and the rerun resumes to every input exactly once."""
    from typer.testing import CliRunner

    from flows.cli import app

    write_outside(tmp_path / "outside")
    faults = run_faults(tmp_path / "faults", tmp_path / "outside", SMOKE)
    problems = []
    for i, fault in enumerate(faults):
        result = CliRunner().invoke(app, [*fault.args, "--output", str(tmp_path / f"out{i}")])
        why = _one_line_error(result, SECRET)
        if why is None and fault.reason not in result.output:
            why = f"the error line does not name {fault.reason!r}: {result.output!r}"
        if why:
            problems.append(f"{fault.name}: {why}")

    # disk full: every write over 40 KB fails (EFBIG, as ENOSPC would) once the big image reaches a shard
    images, out = tmp_path / "disk_in", tmp_path / "disk_out"
    images.mkdir()
    for i in range(3):
        (images / f"a{i}.jpg").write_bytes(jpeg(size=(24, 16)))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)).save(images / "z_big.png")
    args = [sys.executable, "-m", "flows.cli", "build", "--config", str(SMOKE), "--input", str(images),
            "--output", str(out), "--set", "annotate=null", "--set", "shard_size=2"]

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    full = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, preexec_fn=limited)
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    if full.returncode == 0 or len(errors) != 1 or "Traceback" in full.stderr or "resumes" not in errors[0]:
        problems.append(f"disk full: exit {full.returncode}, stderr {full.stderr[-2000:]!r}")
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    rows = _rows(out)
    if resumed.returncode != 0 or sorted(r["source_id"] for r in rows) != ["a0.jpg", "a1.jpg", "a2.jpg", "z_big.png"]:
        problems.append(f"disk full: the rerun gave exit {resumed.returncode}, rows {rows}: {resumed.stderr[-2000:]}")
    elif json.loads(resumed.stdout.strip().splitlines()[-1])["skipped"] != 1:
        problems.append(f"disk full: the rerun did not resume from the finished shard: {resumed.stdout}")

    counts = f"{len(faults) + 1} faults tried, {len(faults) + 1 - len(problems)} ended in one error line"
    print(counts)
    assert not problems, "\n".join([counts, *problems])
