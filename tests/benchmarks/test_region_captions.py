"""benchmarks/region_captions.py's ``--engine vllm`` side where vLLM is absent: one clear message, non-zero exit,
before any model is built (the benchmark itself runs on a GPU, benchmarks/gpu_suite.sh)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_engine_vllm_without_vllm_exits_with_a_clear_message():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "benchmarks/region_captions.py", "--engine", "vllm", "--paper-scale"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--engine vllm needs the vllm package" in result.stderr and "/opt/vllm-venv/bin/python" in result.stderr
    assert result.stdout == ""  # nothing built, nothing timed
