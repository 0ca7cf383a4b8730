"""The Prefect flow ``evaluate`` in-process against a temporary server (``prefect_test_harness``, offline)."""

from __future__ import annotations

import asyncio
import json

import pytest
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.testing.utilities import prefect_test_harness

from flows.evaluate import evaluate
from flows.serve import EVALUATE_DEPLOYMENT, deployments


async def _artifacts(key: str) -> list:
    async with get_client() as client:
        return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def test_evaluate_flow_runs_a_task_and_reports_tables(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    for name, colour in (("red", (200, 0, 0)), ("blue", (0, 0, 200))):
        (tmp_path / "data" / name).mkdir(parents=True)
        Image.new("RGB", (20, 16), colour).save(tmp_path / "data" / name / "0.png")
    out = tmp_path / "res" / "zs.json"
    with prefect_test_harness(server_startup_timeout=60):
        state = evaluate(task="zeroshot", checkpoint=str(tiny_checkpoint[0]),
                         options={"data": str(tmp_path / "data"), "batch_size": 2}, out=str(out),
                         upstream="prefect.flow-run.42", return_state=True)
        assert state.is_completed(), state
        result = state.result()
        markdown = asyncio.run(_artifacts("umg-eval-zeroshot"))
        table = asyncio.run(_artifacts("umg-eval-zeroshot-metrics"))
        bad = evaluate(task="nope", checkpoint=str(tiny_checkpoint[0]), return_state=True)
    assert result["task"] == "zeroshot_classification" and result["n_images"] == 2
    assert set(result["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert json.loads(out.read_text()) == result and out.with_suffix(".md").exists()
    assert len(markdown) == 1 and "top-1" in markdown[0].data and str(tiny_checkpoint[0]) in markdown[0].data
    rows = json.loads(table[0].data) if isinstance(table[0].data, str) else table[0].data
    assert {row["metric"] for row in rows} == set(result["metrics"])
    assert bad.is_failed()
    with pytest.raises(ValueError, match="unknown evaluation task 'nope'"):
        bad.result()


def test_evaluate_is_served_next_to_train():
    names = {f"{d.flow_name}/{d.name}" for d in deployments()}
    assert EVALUATE_DEPLOYMENT in names and "train/local" in names
