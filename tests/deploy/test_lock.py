"""requirements/lock*.txt: one pinned list, complete for pyproject.toml, used by every install."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("lock_requirements", ROOT / "scripts" / "lock_requirements.py")
lock_requirements = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock_requirements)

PIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!_-]+$")


LOCKS = [lock_requirements.LOCK, lock_requirements.DEV_LOCK, lock_requirements.TORCH_LOCK]


@pytest.mark.parametrize("path", LOCKS, ids=lambda p: p.name)
def test_lock_lines_are_exact_pins_without_duplicates(path):
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines, f"{path} is empty"
    bad = [ln for ln in lines if not PIN.match(ln)]
    assert not bad, f"not `name==version`: {bad}"
    names = [canonicalize_name(ln.split("==")[0]) for ln in lines]
    assert len(names) == len(set(names)), "a package is pinned twice"


@pytest.mark.parametrize("extras", [(), lock_requirements.EXTRAS], ids=["dependencies", "dev"])
def test_every_pyproject_dependency_is_pinned_in_the_lock_within_its_bounds(extras):
    # The runtime dependencies in lock.txt (what the images install), the dev extra's in lock-dev.txt.
    lock = lock_requirements.read_lock()
    if extras:
        lock |= lock_requirements.read_lock(lock_requirements.DEV_LOCK)
    missing, outside = [], []
    for req in lock_requirements.project_requirements(ROOT / "pyproject.toml", extras=extras):
        version = lock.get(canonicalize_name(req.name))
        if version is None:
            missing.append(str(req))
        elif not req.specifier.contains(version, prereleases=True):
            outside.append(f"{req} but the lock has {version}")
    hint = "install it into the venv, then `make lock` (scripts/lock_requirements.py)"
    assert not missing, f"pyproject dependencies not in requirements/lock.txt ({hint}): {missing}"
    assert not outside, f"lock pins outside pyproject bounds ({hint}): {outside}"


def test_dev_lock_only_adds_to_the_lock():
    overlap = set(lock_requirements.read_lock()) & set(lock_requirements.read_lock(lock_requirements.DEV_LOCK))
    assert not overlap, f"pinned in both lock.txt and lock-dev.txt: {sorted(overlap)}"


def test_torch_lock_is_the_same_versions_as_the_lock():
    lock, torch_lock = lock_requirements.read_lock(), lock_requirements.read_lock(lock_requirements.TORCH_LOCK)
    assert {"torch", "torchvision"} <= set(torch_lock)
    assert {name: lock.get(name) for name in torch_lock} == torch_lock


def test_closure_follows_extras_and_markers_of_installed_distributions():
    # pytest[dev-less] needs pluggy and iniconfig here; its `dev` extra (hypothesis, ...) is not followed.
    pins = lock_requirements.closure([lock_requirements.Requirement("pytest")])
    assert {"pytest", "pluggy", "iniconfig"} <= set(pins)
    assert "hypothesis" not in pins
    with pytest.raises(LookupError, match="not installed"):
        lock_requirements.closure([lock_requirements.Requirement("no-such-distribution-umg")])
    with pytest.raises(LookupError, match="is installed"):
        lock_requirements.closure([lock_requirements.Requirement("pytest<1")])


@pytest.mark.parametrize("path", ["Makefile", "docker/Dockerfile.cpu", "docker/Dockerfile.cuda"])
def test_every_install_uses_the_lock(path):
    text = (ROOT / path).read_text()
    assert "requirements/lock.txt" in text or "$(LOCK)" in text, f"{path} installs without requirements/lock.txt"
