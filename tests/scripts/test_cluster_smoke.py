"""scripts/cluster_smoke.sh end to end (marker `cluster`): PostgreSQL-backed Prefect, a Ray head + 2 worker nodes,
SeaweedFS holding inputs and shards, the deployments of prefect.yaml on a process worker; one Ray worker node
killed with `kill -9` during the build; build -> train -> adapt -> evaluate by events; a second build run writes
nothing. Everything runs in a network namespace the script creates and removes (needs root)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
N_IMAGES = 48


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (ip netns, runuser)"
    if not shutil.which("ip") or not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        return "needs iproute2 and PostgreSQL (apt-get install iproute2 postgresql; .ci/run installs them)"
    return None


@pytest.mark.cluster
@pytest.mark.timeout(1600)
@pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
def test_cluster_smoke_runs_the_whole_chain_through_the_cluster(tmp_path):
    env = {**os.environ, "CLUSTER_DIR": f"/tmp/umgc-t{os.getpid()}", "N_IMAGES": str(N_IMAGES),
           "BIN": str(Path(sys.executable).parent), "PYTHONPATH": str(ROOT)}
    run = subprocess.run(["bash", str(ROOT / "scripts" / "cluster_smoke.sh")], env=env, capture_output=True,
                         text=True, timeout=1500)
    lines = run.stdout.strip().splitlines()
    assert run.returncode == 0 and lines, run.stdout[-4000:] + run.stderr[-4000:]
    result = json.loads(lines[-1])
    assert result["passed"] and result["valid"], result
    assert result["inputs"] == N_IMAGES and result["ok"] + result["errors"] == N_IMAGES, result
    assert result["shards"] == N_IMAGES // 8 and result["killed_node"].startswith("ray-worker-"), result
    assert result["rerun_changed_objects"] == 0 and result["rerun_train_runs"] == 0, result
    assert result["eval"]["task"] == "zeroshot_classification" and 0 <= result["eval"]["acc1"] <= 1, result
    for service in ("PostgreSQL", "Prefect server", "SeaweedFS S3", "Ray head", "Ray worker 2"):
        assert service in run.stdout, run.stdout[-3000:]
    # everything it started is stopped and its namespace is gone
    assert result["netns"] not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    processes = subprocess.run(["ps", "-eo", "args="], capture_output=True, text=True).stdout
    assert env["CLUSTER_DIR"] not in processes, [p for p in processes.splitlines() if env["CLUSTER_DIR"] in p]
