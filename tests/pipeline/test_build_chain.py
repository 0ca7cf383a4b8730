"""`umg build --config configs/smoke.yaml` on 16 digit scenes with every tiny real backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from pipeline.sample_data import generate_sample
from pipeline.shards import iter_records

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
STAGES = {"tagger", "captioner_blip2", "scorer", "detector_bigdet", "detector_v3det", "merge",
          "region_captioner_crop", "segmenter", "stability", "background"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    generate_sample(root / "raw", n=16, seed=1)
    runner = CliRunner()
    args = ["build", "--config", str(SMOKE), "--input", str(root / "raw"), "--output", str(root / "shards"),
            "--set", f"annotate.tiny_models_dir={root / 'tiny'}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return root, runner, json.loads(result.stdout.strip().splitlines()[-1])


def test_smoke_build_writes_valid_annotated_shards(built):
    root, runner, summary = built
    assert (summary["inputs"], summary["ok"], summary["errors"]) == (16, 16, 0)
    result = runner.invoke(app, ["validate", str(root / "shards")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["samples"] == 16 and report["ok"]


def test_every_stage_left_provenance_and_outputs(built):
    root, _, _ = built
    records = [record for record, _ in iter_records(root / "shards")]
    for record in records:
        assert STAGES <= set(record.provenance), sorted(STAGES - set(record.provenance))
        assert any(tag.annotator == "clip-vocab" for tag in record.tags)
        assert any(c.annotator == "blip2" for c in record.captions)
        assert all(c.clip_score is not None for c in record.captions)
        detected = [r for r in record.regions if r.annotator.startswith("detector_")]
        assert 1 <= len(detected) <= 4  # max_regions
        for region in detected:
            assert region.mask is not None and region.mask.stability is not None
            assert any(c.annotator == "crop+blip2" for c in region.captions)
    assert any(bg.annotator == "background_mask2former" for r in records for bg in r.background)


def test_tiny_models_are_reused_on_a_second_build(built, tmp_path):
    root, runner, _ = built
    before = {p: p.stat().st_mtime_ns for p in (root / "tiny").rglob("tiny_config.json")}
    assert len(before) >= 7
    result = runner.invoke(app, ["build", "--config", str(SMOKE), "--input", str(root / "raw"), "--output",
                                 str(tmp_path / "again"), "--set", f"annotate.tiny_models_dir={root / 'tiny'}",
                                 "--set", "shard_size=8"])
    assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime_ns for p in (root / "tiny").rglob("tiny_config.json")} == before
