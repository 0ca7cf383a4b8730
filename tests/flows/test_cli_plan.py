"""`umg plan-resources`: the ray section it writes validates and is what a config takes; bad costs are one error."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from data_schemas import load_config
from flows.cli import app

ROOT = Path(__file__).resolve().parents[2]
UMG41M, COSTS = ROOT / "configs" / "umg41m.yaml", ROOT / "configs" / "costs" / "umg41m_estimates.json"


def test_writes_a_ray_section_for_two_nodes(tmp_path):
    out = tmp_path / "ray.yaml"
    result = CliRunner().invoke(app, ["plan-resources", "--config", str(UMG41M), "--gpus", "8", "--nodes", "2",
                                      "--costs", str(COSTS), "--out", str(out), "--set", "flow.concurrent_shards=1"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["gpus"] == 16 and summary["costs_measured"] is False
    assert summary["fraction_of_ideal"] >= 0.85
    text = out.read_text()
    assert "ESTIMATED costs" in text.splitlines()[0]
    section = yaml.safe_load(text)["ray"]
    cfg = load_config(UMG41M, [f"ray.resources={json.dumps(section['resources'])}",
                               f"ray.max_in_flight={section['max_in_flight']}"])
    gpus = sum(r.num_gpus * r.pool_size for r in cfg.ray.resources.values())
    one_shard = section["max_in_flight"]
    four = yaml.safe_load(CliRunner().invoke(app, ["plan-resources", "--config", str(UMG41M), "--gpus", "8",
                                                   "--nodes", "2", "--costs", str(COSTS)]).stdout)["ray"]
    assert four["max_in_flight"] == -(-one_shard // 4)  # umg41m.yaml runs 4 shards at once
    assert 15 < gpus <= 16


def test_bad_costs_fail_with_one_error_line(tmp_path):
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps({"measured": True, "stages": {"tagger": {"seconds_per_image": 0.1}}}))
    result = CliRunner().invoke(app, ["plan-resources", "--config", str(UMG41M), "--gpus", "8",
                                      "--costs", str(costs)])
    assert result.exit_code == 2
    assert "error:" in result.output and "missing ['background'" in result.output
