"""`umg build` refuses a bad output or plan with one `error:` line (exit 2) before loading any model,
and a rerun of a finished build returns without loading models."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import pipeline.tiny_models
from flows.cli import app
from pipeline.shards import read_shard_rows

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"


@pytest.fixture
def loads(monkeypatch) -> list:
    """Records every model load `umg build` starts (the loads themselves are skipped: these tests need none)."""
    calls: list = []
    monkeypatch.setattr(pipeline.tiny_models, "prepare_chain", lambda cfg: calls.append(cfg))
    return calls


@pytest.fixture
def images(tmp_path) -> Path:
    root = tmp_path / "in"
    root.mkdir()
    for i in range(5):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(root / f"img_{i}.png")
    return root


def _build(images: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["build", "--config", str(SMOKE), "--input", str(images), "--output", str(out),
                                    *extra])


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_output_that_is_a_file_is_one_error_line_before_models(images, tmp_path, loads) -> None:
    (tmp_path / "out").write_text("a file")
    line = _one_error_line(_build(images, tmp_path / "out"))
    assert "is not a directory" in line and loads == []


def test_output_below_a_file_is_one_error_line(images, tmp_path, loads) -> None:
    (tmp_path / "file").write_text("a file")
    line = _one_error_line(_build(images, tmp_path / "file" / "out"))
    assert "is not a writable directory" in line and loads == []


def test_read_only_output_is_one_error_line_before_models(images, tmp_path, loads, monkeypatch) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    if os.geteuid() == 0:  # root writes through the mode bits: make the write probe fail as EACCES would
        def refuse(*args, dir=None, **kwargs):
            raise PermissionError(13, "Permission denied", str(dir))
        monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    try:
        line = _one_error_line(_build(images, out))
    finally:
        out.chmod(0o755)
    assert "is not a writable directory" in line and "Permission denied" in line and loads == []


def test_non_empty_folder_without_a_build_is_refused_and_left_alone(images, tmp_path, loads) -> None:
    out = tmp_path / "downloads"
    out.mkdir()
    (out / "holiday.tar").write_bytes(b"x")  # resume would discard it as a partial shard
    (out / "notes.tmp").write_text("mine")
    line = _one_error_line(_build(images, out))
    assert "holds no build" in line and loads == []
    assert sorted(p.name for p in out.iterdir()) == ["holiday.tar", "notes.tmp"]


def test_plan_mismatch_is_one_error_line_and_finished_rerun_loads_nothing(images, tmp_path, loads) -> None:
    out = tmp_path / "out"
    first = _build(images, out, "--set", "shard_size=2")
    assert first.exit_code == 0, first.output
    assert len(loads) == 1  # the first build loads the chain once
    again = _build(images, out, "--set", "shard_size=2")
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert (summary["planned"], summary["skipped"], summary["written"]) == (3, 3, 0)
    assert len(loads) == 1  # nothing to do: no model loaded
    line = _one_error_line(_build(images, out, "--set", "shard_size=3"))
    assert "different plan" in line and "shard_size=2" in line and "shard_size=3" in line
    assert len(loads) == 1


def test_follow_symlinks_lets_links_into_the_named_folder_only(images, tmp_path, loads) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(shared / "theirs.png")
    (images / "linked.png").symlink_to(shared / "theirs.png")
    refused = _build(images, tmp_path / "plain")
    assert refused.exit_code == 0, refused.output
    rows = {r["source_id"]: r for r in read_shard_rows(tmp_path / "plain", "00000")}
    assert rows["linked.png"]["error"].startswith("outside_root: ")
    followed = _build(images, tmp_path / "followed", "--follow-symlinks", str(shared))
    assert followed.exit_code == 0, followed.output
    rows = {r["source_id"]: r for r in read_shard_rows(tmp_path / "followed", "00000")}
    assert rows["linked.png"]["status"] == "ok"
    line = _one_error_line(_build(images, tmp_path / "x", "--follow-symlinks", str(tmp_path / "nope")))
    assert "source.follow_symlinks" in line and "is not a directory" in line


def test_paper_config_is_refused_in_process_naming_the_flow(images, tmp_path, loads) -> None:
    """configs/umg41m.yaml puts RAM and GPT4RoI in their own venvs and spreads the models over 8 GPUs:
    one process cannot hold that, so `umg build` says so and names the flow before loading anything."""
    paper = SMOKE.with_name("umg41m.yaml")
    result = CliRunner().invoke(app, ["build", "--config", str(paper), "--input", str(images),
                                      "--output", str(tmp_path / "out")])
    line = _one_error_line(result)
    assert "tagger, region_captioner_gpt4roi run in their own environments" in line, line
    assert re.search(r"reserve \d+(\.\d+)? GPUs", line) and "build-umg41m" in line, line
    assert loads == [] and not (tmp_path / "out").exists()
