"""End to end: served deployments on a local server; a deployment run of build-umg41m (Ray pools with tiny
real backends from configs/smoke.yaml) triggers train/local through the umg.build.completed automation, whose
umg.train.completed event triggers adapt/local, whose umg.adapt.completed event triggers evaluate/local.

Starts: the serve process (by pid; the server comes from the session fixture). Cleans up: stops it by
pid and deletes the automations it created.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from flows import services
from flows.serve import ADAPT_DEPLOYMENT, BUILD_DEPLOYMENT, CHAIN_DEPLOYMENTS, EVALUATE_DEPLOYMENT, TRAIN_DEPLOYMENT
from pipeline.shards import MANIFEST_NAME, finished_shards
from pipeline.validate import validate_build

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"
TRAIN = {"steps": 3, "batch_size": 4, "log_every": 1, "progress": False, "plot": False, "tensorboard": False,
         "data": {"workers": 0, "shuffle_buffer": 16, "shuffle_initial": 4}}


def _e2e_config(path: Path) -> Path:
    """smoke.yaml's tagger + one detector (two actor pools keep it quick), its train section made shorter."""
    smoke = yaml.safe_load(SMOKE.read_text()) if SMOKE.exists() else {}
    annotate = (smoke.get("build") or {}).get("annotate") or {}
    detectors = annotate.get("detectors") or {}
    kept = {k: annotate[k] for k in ("tagger", "merge", "tiny_models_dir") if k in annotate}
    if detectors:
        name = sorted(detectors)[0]
        kept["detectors"] = {name: detectors[name]}
    train = {**(smoke.get("train") or {}), **TRAIN}
    train["data"] = {**((smoke.get("train") or {}).get("data") or {}), **TRAIN["data"]}
    config = {"build": {"shard_size": 8, "annotate": kept or None, "ray": {"num_cpus": 2},
                        "flow": {"retry_delay_s": [1.0], "overlays": 2}},
              "train": train}
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _adapt_config(path: Path) -> Path:
    """configs/adapt_smoke.yaml's global adaptation, 3 steps."""
    adapt = yaml.safe_load((ROOT / "configs" / "adapt_smoke.yaml").read_text())["adapt_global"]
    adapt["train"] = {**adapt["train"], **TRAIN, "loss": adapt["train"].get("loss", {})}
    path.write_text(yaml.safe_dump({"adapt_global": adapt}), encoding="utf-8")
    return path


def _eval_data(root: Path) -> Path:
    """Held-out digits (another seed) as a zero-shot ImageFolder."""
    from pipeline.sample_data import generate_sample
    from pipeline.sample_data.eval_formats import write_eval_layouts

    generate_sample(root, n=10, seed=1)
    write_eval_layouts(root, per_class=1)
    return root / "classification" / "test"


def _latest_artifact(client, key: str):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return sorted(found, key=lambda a: a.created)[-1]


@pytest.mark.e2e
def test_deployment_run_builds_shards_and_triggers_train(prefect_server, sample_raw, tmp_path):
    config = _e2e_config(tmp_path / "e2e.yaml")
    out, train_out, adapt_out = tmp_path / "shards", tmp_path / "train", tmp_path / "adapt"
    eval_out = tmp_path / "eval" / "result.json"
    serve = services.start_serve(prefect_server.url, prefect_server.home, [
        "--train-out", str(train_out), "--adapt-out", str(adapt_out),
        "--adapt-config", str(_adapt_config(tmp_path / "adapt.yaml")),
        "--eval-data", str(_eval_data(tmp_path / "eval_data")), "--eval-out", str(eval_out)],
        log=tmp_path / "serve.log")
    try:
        services.wait_deployments(list(CHAIN_DEPLOYMENTS), prefect_server.url, timeout=180, pid=serve.pid)
        since = dt.datetime.now(dt.UTC)
        run = subprocess.run(
            [services.venv_bin("prefect"), "deployment", "run", BUILD_DEPLOYMENT, "-p", f"config={config}",
             "-p", f"input={sample_raw}", "-p", f"output={out}", "--watch", "--watch-interval", "1",
             "--watch-timeout", "300"],
            env=prefect_server.env, capture_output=True, text=True, timeout=330)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + _tail(tmp_path / "serve.log")

        assert len(finished_shards(out)) == 2 and (out / MANIFEST_NAME).exists()
        report = validate_build(out)
        assert report.ok and report.inputs == 16 and report.regions > 0, report.summary()
        with services.api(prefect_server.url) as client:
            assert _latest_artifact(client, "umg41m-build-progress").data == 100.0
            assert '"shard": "00001"' in _latest_artifact(client, "umg41m-build-shards").data
            assert "complete" in _latest_artifact(client, "umg41m-build-qa").data

        train_run = services.wait_run(TRAIN_DEPLOYMENT, since, prefect_server.url, timeout=240)
        assert train_run.state_type.value == "COMPLETED", _tail(tmp_path / "serve.log")
        assert train_run.parameters["shards"] == str(out.resolve())
        assert train_run.parameters["upstream"].startswith("prefect.flow-run.")
        assert (train_out / "checkpoints" / "latest").exists(), sorted(train_out.rglob("*"))

        adapt_run = services.wait_run(ADAPT_DEPLOYMENT, since, prefect_server.url, timeout=240)
        assert adapt_run.state_type.value == "COMPLETED", _tail(tmp_path / "serve.log")
        assert adapt_run.parameters["upstream"] == f"prefect.flow-run.{train_run.id}"
        assert adapt_run.parameters["checkpoint"].startswith(str(train_out.resolve() / "checkpoints"))
        assert adapt_run.parameters["task"] == "global" and (adapt_out / "adapt.json").exists()

        eval_run = services.wait_run(EVALUATE_DEPLOYMENT, since, prefect_server.url, timeout=240)
        assert eval_run.state_type.value == "COMPLETED", _tail(tmp_path / "serve.log")
        assert eval_run.parameters["upstream"] == f"prefect.flow-run.{adapt_run.id}"
        assert eval_run.parameters["checkpoint"] == str(adapt_out.resolve())
        result = json.loads(eval_out.read_text())
        assert result["task"] == "zeroshot_classification" and 0.0 <= result["metrics"]["acc1"] <= 1.0
        with services.api(prefect_server.url) as client:
            table = _latest_artifact(client, "umg-eval-zeroshot-metrics")
        assert table.flow_run_id == eval_run.id and "acc1" in str(table.data)
    finally:
        services.stop(serve.pid)
        deleted = services.delete_automations(list(CHAIN_DEPLOYMENTS), prefect_server.url)
    assert deleted == 3  # train-after-build, adapt-after-train, evaluate-after-adapt, removed again


def _tail(path: Path, n: int = 4000) -> str:
    return "\n--- serve log ---\n" + path.read_text(errors="replace")[-n:] if path.exists() else ""
