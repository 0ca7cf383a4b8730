"""Stock ``open_clip_train`` trains on our shards in the project's environment (``webdataset`` pinned to what
``open_clip_torch[training]`` accepts: with webdataset 1.x its loader fails with ``KeyError: 'fname'``)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from pipeline.sample_shards import write_sample_shards

TINY_CONFIG = Path(__file__).resolve().parents[2] / "model" / "configs" / "umg-tiny-vit.json"


def test_webdataset_satisfies_open_clip_training_extra():
    wanted = [Requirement(r) for r in metadata.requires("open_clip_torch") or []]
    (spec,) = [r for r in wanted if r.name == "webdataset" and r.marker and r.marker.evaluate({"extra": "training"})]
    installed = metadata.version("webdataset")
    assert spec.specifier.contains(installed), f"webdataset {installed} is outside open_clip_torch[training]'s {spec}"


@pytest.mark.slow
def test_open_clip_train_runs_on_our_shards(tmp_path):
    shards = write_sample_shards(tmp_path / "shards", n=40, seed=0, shard_size=12)["train"]
    tars = sorted(Path(shards["build_dir"]).glob("*.tar"))
    model_dir = tmp_path / "tiny"  # open_clip's "local-dir:" model: a config, random weights
    model_dir.mkdir()
    config = {"model_cfg": json.loads(TINY_CONFIG.read_text()), "preprocess_cfg": {}}
    (model_dir / "open_clip_config.json").write_text(json.dumps(config))
    args = [
        "--dataset-type", "webdataset", "--train-data", f"{tars[0].parent}/{{00000..{len(tars) - 1:05d}}}.tar",
        "--train-num-samples", str(shards["ok"]), "--model", f"local-dir:{model_dir}", "--batch-size", "4",
        "--epochs", "1", "--workers", "1", "--lr", "1e-3", "--warmup", "1", "--precision", "fp32",
        "--logs", str(tmp_path / "logs"), "--name", "tiny", "--save-frequency", "1", "--log-every-n-steps", "1",
    ]
    run = subprocess.run([sys.executable, "-m", "open_clip_train.main", *args], cwd=tmp_path, capture_output=True,
                         text=True, timeout=540)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    steps = re.findall(r"Train Epoch: 0 \[\s*(\d+)/(\d+).*? Loss: ([\d.naif]+)", output)
    assert steps and steps[-1][0] == steps[-1][1] == str(shards["ok"]), output[-3000:]  # every sample seen
    assert all(math.isfinite(float(loss)) for *_, loss in steps)
    assert (tmp_path / "logs" / "tiny" / "checkpoints" / "epoch_1.pt").is_file()
