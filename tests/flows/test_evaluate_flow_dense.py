"""The Prefect flow ``evaluate`` runs the regions and seg tasks (offline ``prefect_test_harness``)."""

from __future__ import annotations

import asyncio
import json

import pytest
from prefect.testing.utilities import prefect_test_harness
from test_evaluate_flow import _artifacts  # the zeroshot flow test's artifact reader

from flows.evaluate import evaluate
from pipeline.sample_data import generate_sample
from pipeline.sample_data.eval_formats import write_eval_layouts

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools + numpy 2


@pytest.mark.slow
def test_evaluate_flow_runs_regions_and_seg(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    generate_sample(tmp_path / "d", n=12, seed=0)
    write_eval_layouts(tmp_path / "d")
    ann, images = tmp_path / "d" / "annotations", str(tmp_path / "d" / "images" / "val")
    seg_options = {"images": images, "masks": str(ann / "semantic_val"), "classes": str(ann / "classes.txt"),
                   "panoptic": str(ann / "panoptic_val.json")}
    with prefect_test_harness(server_startup_timeout=60):
        regions = evaluate(task="regions", checkpoint=str(tiny_checkpoint[0]),
                           options={"images": images, "annotations": str(ann / "instances_val.json")})
        seg = evaluate(task="seg", checkpoint=str(tiny_checkpoint[0]), options=seg_options,
                       out=str(tmp_path / "seg.json"))
        markdown = asyncio.run(_artifacts("umg-eval-seg"))
        table = asyncio.run(_artifacts("umg-eval-regions-metrics"))
    assert regions["task"] == "zeroshot_region_classification" and "box_ap" in regions["metrics"]
    assert seg["task"] == "semantic_segmentation" and {"miou", "pq"} <= set(seg["metrics"])
    assert json.loads((tmp_path / "seg.json").read_text()) == seg
    assert len(markdown) == 1 and "mIoU" in markdown[0].data and "PQ" in markdown[0].data
    rows = json.loads(table[0].data) if isinstance(table[0].data, str) else table[0].data
    assert {row["metric"] for row in rows} == set(regions["metrics"])
