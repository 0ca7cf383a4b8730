"""Resource planning: slots to the bottleneck, actors that pack, the ray section a config gets, bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from data_schemas import load_config
from data_schemas.config import RayConfig
from pipeline.resource_plan import (
    StageCost,
    in_flight_batches,
    load_costs,
    plan_for_config,
    plan_resources,
    ray_section,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = {"tagger": 1.0, "detector": 1.0, "captioner": 2.0, "scorer": 0.5, "region_captioner": 12.0}


def _costs(table: dict[str, float], **min_gpus: float) -> dict[str, StageCost]:
    return {stage: StageCost(cost, min_gpus.get(stage, 0.0)) for stage, cost in table.items()}


def test_example_gives_the_bottleneck_most_gpus_and_nearly_the_ideal():
    plan = plan_resources(_costs(EXAMPLE), gpus=8, slots_per_gpu=8)
    slots = {stage: pool.slots for stage, pool in plan.pools.items()}
    assert slots == {"tagger": 4, "detector": 4, "captioner": 8, "scorer": 2, "region_captioner": 46}
    assert plan.gpus_used == 8
    assert plan.bottleneck == "region_captioner"
    assert plan.ideal == pytest.approx(8 / 16.5)
    assert plan.throughput == pytest.approx(46 / 8 / 12)
    assert plan.throughput / plan.ideal > 0.98
    # no stage could take a slot from another without becoming slower than the bottleneck
    for stage, pool in plan.pools.items():
        if stage != plan.bottleneck:
            assert (pool.slots - 1) / 8 / pool.cost < plan.throughput


def test_actor_sizes_divide_a_gpu_and_respect_min_gpus():
    plan = plan_resources(_costs(EXAMPLE, region_captioner=0.5, captioner=0.25), gpus=8, slots_per_gpu=8)
    for pool in plan.pools.values():
        assert 8 % pool.actor_slots == 0 and pool.pool_size * pool.actor_slots == pool.slots
    assert plan.pools["region_captioner"].num_gpus in (0.5, 1.0)
    assert plan.pools["region_captioner"].slots % 4 == 0
    assert plan.pools["captioner"].num_gpus >= 0.25
    assert plan.pools["captioner"].actor_slots == 8  # 8 slots: one whole-GPU actor, not four small ones


def test_a_free_stage_is_never_the_bottleneck():
    plan = plan_resources(_costs({"merge_like": 0.0, "model": 1.0}), gpus=2, slots_per_gpu=4)
    assert plan.pools["merge_like"].slots == 1 and plan.pools["model"].slots == 7
    assert plan.bottleneck == "model" and math.isinf(plan.pools["merge_like"].images_per_s)


def test_more_gpus_scale_the_throughput():
    one = plan_resources(_costs(EXAMPLE), gpus=8)
    eight = plan_resources(_costs(EXAMPLE), gpus=64)
    assert eight.throughput / eight.ideal >= one.throughput / one.ideal - 1e-9
    assert eight.throughput == pytest.approx(8 * one.ideal, rel=0.02)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"gpus": 1, "slots_per_gpu": 6}, "power of two"),
    ({"gpus": 0}, "at least one GPU"),
    ({"gpus": 1, "slots_per_gpu": 4}, "cannot hold one actor"),
])
def test_impossible_plans_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_resources(_costs(EXAMPLE), **kwargs)


def test_stage_cost_checks_its_fields():
    with pytest.raises(ValueError, match="at most one GPU"):
        StageCost(1.0, min_gpus=2.0)
    with pytest.raises(ValueError, match="finite number"):
        StageCost(float("nan"))


def test_in_flight_covers_every_actor():
    plan = plan_resources(_costs(EXAMPLE), gpus=8)
    chunks = dict.fromkeys(EXAMPLE, 4)
    # 4 single-actor pools hold one batch of 16 each; 23 actors of the bottleneck hold 23 x 4 / 16 batches
    assert in_flight_batches(plan, chunks, 16, headroom=1.0) == math.ceil(4 + 23 * 4 / 16)
    assert in_flight_batches(plan, chunks, 16) == math.ceil(2 * (4 + 23 * 4 / 16))


def test_ray_section_keeps_what_the_config_gave_each_pool():
    ray_cfg = RayConfig(batch_size=16, resources={
        "captioner": {"num_cpus": 4, "batch_size": 32, "runtime_env": {"py_executable": "/opt/venv/bin/python"}}})
    plan = plan_resources(_costs(EXAMPLE), gpus=8)
    kinds = {stage: stage for stage in EXAMPLE}
    section = ray_section(plan, ray_cfg, kinds, concurrent_shards=2, cpus=32)
    captioner = section["resources"]["captioner"]
    assert captioner == {"num_cpus": 4, "num_gpus": 1.0, "pool_size": 1, "batch_size": 32,
                         "runtime_env": {"py_executable": "/opt/venv/bin/python"}}
    # 32 CPUs over 8 GPUs: a quarter-GPU actor may take 1 CPU, below the default's 0.25 stays 0.25
    assert section["resources"]["region_captioner"]["num_cpus"] == 0.25
    assert section["max_in_flight"] >= 1
    RayConfig.model_validate({"resources": section["resources"]})  # valid StageResources


def _costs_file(tmp_path, stages: dict[str, float], measured=False) -> Path:
    path = tmp_path / "costs.json"
    path.write_text(json.dumps({"measured": measured, "note": "test",
                                "stages": {s: {"seconds_per_image": c, "min_gpus": 0.125} for s, c in stages.items()}}))
    return path


def test_umg41m_estimates_plan_for_one_node():
    cfg = load_config(ROOT / "configs" / "umg41m.yaml")
    table = load_costs(ROOT / "configs" / "costs" / "umg41m_estimates.json")
    assert not table.measured
    plan, section = plan_for_config(cfg, table, gpus=8)
    assert plan.gpus_used <= 8
    assert plan.throughput / plan.ideal >= 0.85
    assert set(section["resources"]) == set(cfg.annotate.model_stages())
    assert section["resources"]["tagger"]["runtime_env"] == {"py_executable": "/opt/ram-venv/bin/python"}
    merged = cfg.ray.model_copy(update={"resources": {}}).model_validate(
        {**cfg.ray.model_dump(), **section})
    for stage, (kind, _) in cfg.annotate.model_stages().items():
        assert merged.resources_for(stage, kind).num_gpus == plan.pools[stage].num_gpus


def test_shipped_umg41m_layout_is_the_plan():
    """configs/umg41m.yaml carries what `umg plan-resources` writes for one 8-GPU node from the estimates."""
    cfg = load_config(ROOT / "configs" / "umg41m.yaml")
    table = load_costs(ROOT / "configs" / "costs" / "umg41m_estimates.json")
    _, section = plan_for_config(cfg, table, gpus=8, cpus=96)
    rerun = ("configs/umg41m.yaml's ray section is not the plan: rerun `umg plan-resources --config "
             "configs/umg41m.yaml --gpus 8 --cpus-per-node 88 --costs configs/costs/umg41m_estimates.json`")
    assert cfg.ray.max_in_flight == section["max_in_flight"], rerun
    for stage, planned in section["resources"].items():
        assert cfg.ray.resources[stage].model_dump(exclude_none=True) == planned, rerun


def test_costs_must_match_the_pools(tmp_path):
    cfg = load_config(ROOT / "configs" / "smoke.yaml", ["ray.mode=stages"])
    stages = dict.fromkeys(cfg.annotate.model_stages(), 0.1)
    stages.pop("tagger")
    stages["taggr"] = 0.1
    with pytest.raises(ValueError, match=r"missing \['tagger'\], not in the config \['taggr'\]"):
        plan_for_config(cfg, load_costs(_costs_file(tmp_path, stages)), gpus=8)


def test_chain_mode_is_refused(tmp_path):
    cfg = load_config(ROOT / "configs" / "smoke.yaml", ["ray.mode=chain"])
    stages = dict.fromkeys(cfg.annotate.model_stages(), 0.1)
    with pytest.raises(ValueError, match="ray.mode is 'chain'"):
        plan_for_config(cfg, load_costs(_costs_file(tmp_path, stages)), gpus=8)


def test_bad_costs_file_is_named(tmp_path):
    path = tmp_path / "costs.json"
    path.write_text('{"measured": false, "stages": {"tagger": {"min_gpus": 0.1}}}')
    with pytest.raises(ValueError, match=r"stages.tagger: 'seconds_per_image'"):
        load_costs(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="needs 'measured'"):
        load_costs(path)
