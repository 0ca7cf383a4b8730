"""`umg build`: a stage failing on most of a shard stops the build with one `error:` line and commits nothing;
`--retry-errors` rebuilds committed error rows of an infrastructure kind once the fault is gone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers_backends import ScriptedTagger
from PIL import Image
from typer.testing import CliRunner

import pipeline.tiny_models
from flows.cli import app
from pipeline.shards import finished_shards, read_shard_rows
from pipeline.stages import Chain, TagStage


@pytest.fixture
def broken(tmp_path, monkeypatch) -> Path:
    """While this file exists the tagger fails on every image (a broken GPU)."""
    marker = tmp_path / "gpu-broken"
    marker.touch()
    tagger = ScriptedTagger(broken_marker=str(marker))
    tagger.load()
    monkeypatch.setattr(pipeline.tiny_models, "prepare_chain", lambda cfg: Chain([TagStage("tagger", tagger)]))
    return marker


def _build(tmp_path: Path, *extra: str):
    root = tmp_path / "in"
    if not root.exists():
        root.mkdir()
        for i in range(8):
            Image.fromarray(np.full((16, 16 + i, 3), 30 * i, np.uint8)).save(root / f"img_{i}.png")
    config = tmp_path / "c.yaml"
    config.write_text("shard_size: 4\nannotate: {tagger: {backend: test-tagger}}\n")
    return CliRunner().invoke(app, ["build", "--config", str(config), "--input", str(root), "--output",
                                    str(tmp_path / "out"), *extra])


def test_breaker_stops_the_build_with_one_error_line(tmp_path, broken):
    result = _build(tmp_path)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: shard 00000: stage tagger failed on 4 of 4 inputs")
    assert finished_shards(tmp_path / "out") == []


def test_retry_errors_rebuilds_committed_error_rows(tmp_path, broken):
    first = _build(tmp_path, "--set", "breaker.max_stage_failure=1.0")  # breaker off: error rows committed
    assert first.exit_code == 0, first.output
    assert json.loads(first.output.strip().splitlines()[-1])["errors"] == 8
    broken.unlink()
    again = json.loads(_build(tmp_path).output.strip().splitlines()[-1])
    assert again["written"] == 0 and again["repaired"] == 0  # resume alone leaves them
    fixed = _build(tmp_path, "--retry-errors")
    assert fixed.exit_code == 0, fixed.output
    assert json.loads(fixed.output.strip().splitlines()[-1])["repaired"] == 2
    rows = [row for name in finished_shards(tmp_path / "out") for row in read_shard_rows(tmp_path / "out", name)]
    assert len(rows) == 8 and all(row["status"] == "ok" for row in rows)
