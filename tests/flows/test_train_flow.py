"""The Prefect flow ``train`` in-process against a temporary server (``prefect_test_harness``, offline)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.testing.utilities import prefect_test_harness

import model
from flows.train import train
from pipeline.sample_shards import write_sample_shards


@pytest.fixture
def shards(tmp_path):
    write_sample_shards(tmp_path / "shards", n=10, seed=0, shard_size=16)
    return tmp_path / "shards" / "train"


async def _artifact_markdown(key: str) -> list[str]:
    async with get_client() as client:
        found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return [artifact.data for artifact in found]


def test_train_flow_trains_and_reports_the_checkpoint(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    config = tmp_path / "smoke.yaml"
    config.write_text("train:\n  batch_size: 4\n  steps: 2\n  data:\n    workers: 0\n  progress: false\n"
                      "  tensorboard: false\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with prefect_test_harness(server_startup_timeout=60):
            state = train(shards=str(shards), config=str(config), out=str(tmp_path / "run"),
                          overrides=["optim.lr=1e-3"], upstream="prefect.flow-run.1234", return_state=True)
            assert state.is_completed(), state
            result = state.result()
            markdown = asyncio.run(_artifact_markdown("umg-train-result"))
    finally:
        torch.set_num_threads(threads)
    assert result["steps"] == 2 and result["checkpoint"].endswith("step_00000002")
    assert set(result["final_losses"]) == {"loss", "image_caption_loss", "region_caption_loss", "image_tag_loss",
                                           "region_tag_loss"}
    assert len(markdown) == 1 and result["checkpoint"] in markdown[0] and "prefect.flow-run.1234" in markdown[0]
    assert (tmp_path / "run" / "loss_curve.png").exists()
    assert model.load_checkpoint(result["checkpoint"]).clip.logit_scale.shape == ()
