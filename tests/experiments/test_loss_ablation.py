"""experiments/loss_ablation.py --quick (with --jobs 2): everything runs and writes its outputs (no accuracy
thresholds)."""

from __future__ import annotations

import csv
import json

import pytest

from experiments.ablation_report import aggregate, markdown_table
from experiments import loss_ablation
from experiments.loss_ablation import load_variants, main

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools + numpy 2


def test_quick_run_writes_table_json_plot_and_prints_json_last(tmp_path, capsys):
    out = tmp_path / "abl"
    assert main(["--quick", "--out", str(out), "--jobs", "2", "--adapt-seg",
                 "--variants", "image_caption", "region_caption", "tag_only"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((out / "loss_ablation.json").read_text())
    assert printed == report
    assert [r["variant"] for r in report["runs"]] == ["image_caption", "region_caption", "tag_only"]  # serial order
    assert report["jobs"] == 2 and report["adapt_seg"] is True and report["adapt_steps"] == 2
    for record in report["runs"]:
        assert set(record["metrics"]) == {"zeroshot_acc1", "i2t_r1", "t2i_r1", "i2t_r1_grouped", "t2i_r1_grouped",
                                          "region_digit_acc1", "seg_miou", "seg_miou_adapted"}
        assert all(0.0 <= v <= 1.0 for v in record["metrics"].values())
    # same seed -> same init and first batch: the step-1 image-caption loss agrees where the term is on
    first = {r["variant"]: next(csv.DictReader(open(r["metrics_csv"]))) for r in report["runs"]}
    assert first["image_caption"]["image_caption_loss"] == first["region_caption"]["image_caption_loss"]
    assert float(first["image_caption"]["region_caption_loss"]) == 0.0
    assert float(first["tag_only"]["image_caption_loss"]) == 0.0 < float(first["tag_only"]["image_tag_loss"])
    md = (out / "loss_ablation.md").read_text()
    assert "| region_caption |" in md and "49.9" in md and report["command"] in md
    assert (out / "loss_ablation.png").stat().st_size > 0

    # --reuse-runs (serial): no training, the same checkpoints re-evaluated -> the same training-free metrics
    assert main(["--quick", "--out", str(out), "--reuse-runs", "--variants", "image_caption", "tag_only"]) == 0
    again = json.loads((out / "loss_ablation.json").read_text())
    before = {r["variant"]: r for r in report["runs"]}
    for record in again["runs"]:
        assert record["reused"] and record["train_s"] == 0.0 and record["checkpoint"] == before[record["variant"]][
            "checkpoint"]
        assert record["metrics"]["region_digit_acc1"] == before[record["variant"]]["metrics"]["region_digit_acc1"]


def test_serial_runs_report_after_each_and_keep_task_order(monkeypatch):
    monkeypatch.setattr(loss_ablation, "run_one", lambda task: {"variant": task["variant"]})
    seen = []
    records = loss_ablation.run_tasks([{"variant": "a"}, {"variant": "b"}], 1, lambda r: seen.append(list(r)))
    assert records == [{"variant": "a"}, {"variant": "b"}]
    assert seen == [[{"variant": "a"}], [{"variant": "a"}, {"variant": "b"}]]


def test_aggregate_mean_and_sample_std_and_table():
    runs = [{"variant": "image_caption", "metrics": {"seg_miou": 0.2}},
            {"variant": "image_caption", "metrics": {"seg_miou": 0.4}}]
    summary = aggregate(runs)
    assert summary["image_caption"]["seg_miou"]["mean"] == pytest.approx(0.3)
    assert summary["image_caption"]["seg_miou"]["std"] == pytest.approx(0.1414213, rel=1e-5)
    assert "| image_caption | 30.0 ± 14.1 | 71.7 | 73.9 | 47.7 |" in markdown_table(summary)


def test_bad_variant_config_and_unknown_variant_are_clear_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: 1}\nablation:\n  variants:\n    x: loss.tags=false\n")
    with pytest.raises(ValueError, match="ablation.variants.x must be a list"):
        load_variants(bad)
    assert main(["--quick", "--out", str(tmp_path / "o"), "--variants", "nope"]) == 2
    assert "error: unknown variants ['nope']" in capsys.readouterr().err
