"""The Prefect flow ``adapt`` in-process against a temporary server (``prefect_test_harness``, offline)."""

from __future__ import annotations

import asyncio

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.testing.utilities import prefect_test_harness

from flows.adapt import adapt
from model.loading import create_model_and_transforms
from pipeline.sample_shards import write_sample_shards


async def _artifact_markdown(key: str) -> list[str]:
    async with get_client() as client:
        found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return [artifact.data for artifact in found]


@pytest.mark.usefixtures("single_thread")
def test_adapt_flow_global_writes_a_loadable_checkpoint_and_reports_parameters(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    write_sample_shards(tmp_path / "shards", n=10, seed=0, shard_size=16)
    config = tmp_path / "adapt.yaml"
    config.write_text("adapt_global:\n  train:\n    batch_size: 4\n    steps: 2\n    data: {workers: 0}\n"
                      "    progress: false\n    tensorboard: false\n    plot: false\n")
    with prefect_test_harness(server_startup_timeout=60):
        state = adapt(task="global", checkpoint="umg-tiny-vit", shards=str(tmp_path / "shards" / "train"),
                      out=str(tmp_path / "adapted"), config=str(config), overrides=["convpass.dim=4"],
                      return_state=True)
        assert state.is_completed(), state
        result = state.result()
        markdown = asyncio.run(_artifact_markdown("umg-adapt-global"))
        failed = adapt(task="detect", checkpoint="umg-tiny-vit", out=str(tmp_path / "x"), return_state=True)
    assert result["steps"] == 2 and 0 < result["trainable_params"] < result["total_params"]
    assert len(markdown) == 1 and f"{result['trainable_params']:,}" in markdown[0]
    model, _, _ = create_model_and_transforms(result["checkpoint"])
    assert sum(p.numel() for n, p in model.named_parameters() if ".adapter_" in n) == result["trainable_params"]
    assert failed.is_failed()
    with pytest.raises(ValueError, match="global or seg"):
        failed.result()
