"""experiments/annotation_noise.py --quick: the three shard sets are built, audited, trained on and evaluated
(no accuracy thresholds), and a bad noise config is one error line."""

from __future__ import annotations

import json

import pytest

from experiments.annotation_audit import filter_removals
from experiments.annotation_noise import BUILDS, main

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools + numpy 2


def test_quick_run_builds_audits_trains_and_prints_json_last(tmp_path, capsys):
    out = tmp_path / "noise"
    assert main(["--quick", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((out / "annotation_noise.json").read_text())
    assert printed == report
    assert list(report["runs"]) == ["clean", *BUILDS]
    for run in report["runs"].values():
        assert set(run["metrics"]) == {"zeroshot_acc1", "i2t_r1", "t2i_r1", "i2t_r1_grouped", "t2i_r1_grouped",
                                       "region_digit_acc1", "seg_miou"}
    clean, off, on = (report["builds"][name]["audit"] for name in ("clean", *BUILDS))
    assert clean["region_precision"] == clean["caption_precision_kept"] == clean["mask_mean_iou"] == 1.0
    # the same oracle outputs before the filters: filters only ever remove
    assert off["captions"] == on["captions"] and on["captions_kept"] <= off["captions_kept"] == off["captions"]
    assert on["regions"] < off["regions"] and off["masks"] == off["regions"] and on["masks"] < on["regions"]
    assert -1.0 <= report["scorer"]["threshold"] <= 1.0 and report["scorer"]["model"].startswith("local-dir:")
    md = (out / "annotation_noise.md").read_text()
    assert "| filters_on |" in md and report["command"] in md


def test_noise_config_without_filters_off_is_an_error_line(tmp_path, capsys):
    bad = tmp_path / "noise.yaml"
    bad.write_text("build: {annotate: {}}\n")
    assert main(["--quick", "--out", str(tmp_path / "o"), "--noise", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "filters_off" in err


def test_filter_removals_by_hand():
    off = {"captions_kept": 10, "captions_kept_true": 7, "regions": 12, "regions_right": 5, "regions_spurious": 3,
           "regions_duplicate": 2, "masks": 12}
    on = {"captions_kept": 8, "captions_kept_true": 6, "regions": 7, "regions_right": 5, "regions_spurious": 1,
          "regions_duplicate": 0, "masks": 4}
    assert filter_removals(off, on) == {"captions_true": 1, "captions_wrong": 1, "regions_right": 0,
                                        "regions_wrong_label": 1, "regions_duplicate": 2, "regions_spurious": 2,
                                        "masks": 8}
