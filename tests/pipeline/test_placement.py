"""Which build configs `umg build` can run in one process (pipeline.placement)."""

from __future__ import annotations

from pathlib import Path

from data_schemas import load_config
from pipeline.placement import in_process_refusal, stage_layout

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_smoke_config_runs_in_process() -> None:
    cfg = load_config(CONFIGS / "smoke.yaml")
    assert stage_layout(cfg) == ([], 0.0) and in_process_refusal(cfg) is None


def test_paper_config_needs_the_flow() -> None:
    own_env, gpus = stage_layout(load_config(CONFIGS / "umg41m.yaml"))
    assert own_env == ["tagger", "region_captioner_gpt4roi"] and 7 < gpus <= 8  # one 8-GPU node


def test_stages_reserving_more_than_one_gpu_are_refused() -> None:
    cfg = load_config(CONFIGS / "smoke.yaml", ["ray.mode=stages", "ray.resources={}", "ray.default.num_gpus=1"])
    assert stage_layout(cfg) == ([], 8.0)  # 8 model stages x 1 GPU
    assert "reserve 8 GPUs" in in_process_refusal(cfg)


def test_one_gpu_in_total_runs_in_process() -> None:
    cfg = load_config(CONFIGS / "smoke.yaml", ["ray.mode=stages", "ray.resources={}", "ray.default.num_gpus=0.125"])
    assert stage_layout(cfg) == ([], 1.0) and in_process_refusal(cfg) is None


def test_chain_mode_counts_the_chain_actors() -> None:
    cfg = load_config(CONFIGS / "smoke.yaml", ["ray.resources.chain.runtime_env={pip: [x]}"])
    assert stage_layout(cfg) == (["chain"], 0.0) and "chain run in their own environments" in in_process_refusal(cfg)
