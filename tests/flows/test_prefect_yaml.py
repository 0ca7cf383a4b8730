"""prefect.yaml: every deployment's parameters (its own, plus what its trigger passes from the event it waits
for) load through the flow's own config loaders, and the chain's triggers match the events the flows emit.

(The `train/cluster` deployment once got the build config `configs/umg41m.yaml`, which has no `train:`
section: its first triggered run failed with "build: Extra inputs are not permitted".)
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import yaml
from prefect.flows import load_flow_from_entrypoint

from data_schemas import ConfigError
from flows.chain import LINKS, check_parameters, payload_parameters
from flows.serve import ChainSettings, deployments

ROOT = Path(__file__).resolve().parents[2]
PREFECT_YAML = yaml.safe_load((ROOT / "prefect.yaml").read_text(encoding="utf-8"))
TEMPLATE = re.compile(r"^\{\{ event\.payload\.(\w+) \}\}$")
# what an emitted event's payload holds (shapes of flows/build.py, flows/train.py, flows/adapt.py)
PAYLOAD_EXAMPLE = {"shards": "/data/umg41m", "config": str(ROOT / "configs/umg41m.yaml"),
                   "upstream": "prefect.flow-run.0", "checkpoint": "/data/train/checkpoints/step_1"}


def _flow(entrypoint: str):
    return load_flow_from_entrypoint(str(ROOT / entrypoint))


def _run_parameters(deployment: dict, trigger: dict | None, payload: dict = PAYLOAD_EXAMPLE) -> dict:
    """The parameters a run gets: the deployment's, overlaid by the trigger's (templates filled from ``payload``)."""
    params = dict(deployment.get("parameters") or {})
    for name, value in ((trigger or {}).get("parameters") or {}).items():
        match = TEMPLATE.match(str(value))
        params[name] = payload[match.group(1)] if match else value
    return params


DEPLOYMENTS = [pytest.param(d, id=f"{d['entrypoint'].split(':')[1]}/{d['name']}") for d in PREFECT_YAML["deployments"]]


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_each_deployment_loads_its_config_through_the_flows_loaders(deployment, monkeypatch):
    monkeypatch.chdir(ROOT)  # the worker runs flows from the project dir (pull step), so config paths are relative
    flow = _flow(deployment["entrypoint"])
    for trigger in deployment.get("triggers") or [None]:
        params = _run_parameters(deployment, trigger)
        required = {n for n, p in inspect.signature(flow.fn).parameters.items() if p.default is p.empty}
        assert required <= set(params), f"{flow.name}: no value for {sorted(required - set(params))}"
        flow.validate_parameters(params)  # names and types against the flow's signature
        check_parameters(flow.name, params)


@pytest.mark.parametrize("deployment", [d for d in DEPLOYMENTS if d.values[0].get("triggers")])
def test_each_trigger_waits_for_an_event_the_chain_emits_and_reads_only_its_payload(deployment):
    for trigger in deployment["triggers"]:
        (event,) = trigger["expect"]
        prefix, fields = LINKS[event]
        assert trigger["match"] == {"prefect.resource.id": f"{prefix}.*"}
        templated = {k: v for k, v in trigger["parameters"].items() if TEMPLATE.match(str(v))}
        assert templated == payload_parameters(event), "prefect.yaml and flows/chain.py disagree"
        assert {TEMPLATE.match(v).group(1) for v in templated.values()} <= set(fields)


def test_the_chain_is_complete_in_prefect_yaml():
    flows = [d["entrypoint"].split(":")[1] for d in PREFECT_YAML["deployments"]]
    events = {d["entrypoint"].split(":")[1]: d["triggers"][0]["expect"][0] for d in PREFECT_YAML["deployments"]
              if d.get("triggers")}
    assert flows == ["build_umg41m", "train", "adapt", "evaluate"]
    assert events == {"train": "umg.build.completed", "adapt": "umg.train.completed",
                      "evaluate": "umg.adapt.completed"}


def test_the_bug_this_file_had_is_caught():
    """The build config as train config fails the check the way the flow failed."""
    with pytest.raises(ConfigError, match="Extra inputs are not permitted"):
        check_parameters("train", {"config": str(ROOT / "configs/umg41m.yaml"), "shards": "/data"})


def test_local_serve_deployments_pass_the_same_checks(monkeypatch, tmp_path):
    """Locally train/local takes the build's config from the event: make demo's configs/smoke.yaml holds both."""
    monkeypatch.chdir(ROOT)
    served = {f"{d.flow_name}/{d.name}": d for d in deployments(ChainSettings(eval_data=str(tmp_path)))}
    triggered = {name: d.triggers[0] for name, d in served.items() if d.triggers}
    assert sorted(triggered) == ["adapt/local", "evaluate/local", "train/local"]
    payload = {**PAYLOAD_EXAMPLE, "config": str(ROOT / "configs/smoke.yaml")}
    for name, trigger in triggered.items():
        params = _run_parameters({"parameters": served[name].parameters}, {"parameters": trigger.parameters}, payload)
        check_parameters(name.split("/")[0], params)
