"""Small protocol-conforming annotator backends for the orchestration tests (no models).

Ray workers import this module by name (``helpers_backends``): tests put this folder on the workers'
``PYTHONPATH`` through ``ray.runtime_env`` (``ray_env()``). ``register_all()`` registers the backends
under the ``test-*`` names in the driver.

Behaviour is driven by config keys so one class covers every failure the tests need:

- ``delay_s``: sleep per call (to kill something mid-shard); ``delay_per_image_s``: and per image (a slow model);
- ``log``: a file; every call appends ``"<pid> <n images> <first width>"`` (who ran what);
- ``fail_width``: an image of this width raises ``ValueError`` (a bad image -> one error row);
- ``oom_width`` / ``oom_max_batch``: a batch holding an image of that width, or more than ``oom_max_batch``
  images, raises ``RuntimeError("CUDA out of memory ...")`` (the batch is split, then per-image errors);
- ``fail_load``: ``load()`` raises ``FileNotFoundError`` (a bad model path);
- ``broken_marker``: while this file exists every call raises a CUDA-like error (a broken GPU: systematic);
- ``exit_width``: a batch holding an image of that width ends the worker process (``os._exit``): a lost worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml

import annotators
from annotators import DetectorOutput
from data_schemas import Tag

HERE = Path(__file__).resolve().parent


def pythonpath_with_helpers() -> str:
    return os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))


def ray_env() -> dict:
    """``ray.runtime_env`` that lets Ray workers import this module."""
    return {"env_vars": {"PYTHONPATH": pythonpath_with_helpers()}}


class _Scripted:
    kind = "tagger"
    name = "test"

    def __init__(self, **cfg) -> None:
        self.cfg = cfg
        self.loaded = False

    @classmethod
    def from_config(cls, cfg):
        return cls(**{k: v for k, v in cfg.items() if k != "backend"})

    @property
    def version(self) -> str:
        return str(self.cfg.get("version", "1"))

    def load(self) -> None:
        if self.cfg.get("fail_load"):
            raise FileNotFoundError(f"no model file {self.cfg['fail_load']} (simulated)")
        self.loaded = True

    def _before_call(self, images) -> None:
        if not self.loaded:
            raise RuntimeError("load() was not called")
        cfg = self.cfg
        if cfg.get("log"):
            with open(cfg["log"], "a", encoding="utf-8") as handle:
                handle.write(f"{os.getpid()} {len(images)} {images[0].width if images else 0}\n")
        if cfg.get("delay_s") or cfg.get("delay_per_image_s"):
            time.sleep(float(cfg.get("delay_s", 0.0)) + float(cfg.get("delay_per_image_s", 0.0)) * len(images))
        widths = [image.width for image in images]
        if cfg.get("broken_marker") and Path(cfg["broken_marker"]).exists():
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
        if cfg.get("exit_width") in widths:
            os._exit(3)
        if cfg.get("oom_width") in widths or len(images) > int(cfg.get("oom_max_batch", 1 << 30)):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        if cfg.get("fail_width") in widths:
            raise ValueError(f"cannot tag an image of width {cfg['fail_width']} (simulated)")


class ScriptedTagger(_Scripted):
    """Tags every image ``"w<width>"`` with score 0.9."""

    name = "test-tagger"

    def __call__(self, images):
        self._before_call(images)
        return [[Tag(name=f"w{image.width}", score=0.9, annotator=self.name)] for image in images]


class ScriptedDetector(_Scripted):
    """Two boxes per image: one kept (score 0.9), one dropped by the 0.3 score threshold (0.1)."""

    kind = "detector"
    name = "test-detector"

    def __call__(self, images):
        self._before_call(images)
        out = []
        for image in images:
            w, h = image.width, image.height
            boxes = np.array([[0, 0, w / 2, h / 2], [w / 2, h / 2, w, h]], dtype=np.float32)
            out.append(DetectorOutput(boxes, np.array([0.9, 0.1], np.float32), ["thing", "other"]))
        return out


class DeviceTagger(ScriptedTagger):
    """A tagger with a ``device`` key, resolved the way the model backends resolve it (``_devices``), and an
    optional ``requires``: a module imported at load through ``annotators.base.require`` (an optional package)."""

    name = "test-device-tagger"

    def __init__(self, *, device: str = "auto", requires: str | None = None, **cfg) -> None:
        super().__init__(**cfg)
        self.device, self.requires = device, requires

    @classmethod
    def from_config(cls, cfg):
        return cls(**{k: v for k, v in cfg.items() if k != "backend"})

    def load(self) -> None:
        from annotators._devices import resolve_device

        resolve_device(self.device)
        if self.requires:
            module = annotators.base.require(self.requires, "the test's own environment provides it")
            self.cfg["version"] = getattr(module, "VERSION", "?")
        super().load()


BACKENDS = {"tagger": [("test-tagger", "helpers_backends:ScriptedTagger"),
                       ("test-device-tagger", "helpers_backends:DeviceTagger")],
            "detector": [("test-detector", "helpers_backends:ScriptedDetector")]}


def register_all() -> None:
    for kind, entries in BACKENDS.items():
        for name, target in entries:
            annotators.register(kind, name, target)


def write_config(path: Path, annotate: dict | None, shard_size: int = 4, **sections) -> Path:
    """A ``build:`` config using the test backends (Ray workers import them via ``ray.runtime_env``)."""
    build = {"shard_size": shard_size, "annotate": annotate,
             "ray": {"num_cpus": 2, "runtime_env": ray_env(), "batch_size": 2, "max_in_flight": 2,
                     "default": {"num_cpus": 0.25, "batch_size": 2}},
             "flow": {"shard_retries": 2, "retry_delay_s": [0.2], "overlays": 2}}
    for key, value in sections.items():
        build[key] = {**build.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump({"build": build}), encoding="utf-8")
    return path


KILLABLE = ("import sys, helpers_backends; helpers_backends.register_all(); from flows.build import build_umg41m; "
            "build_umg41m(sys.argv[1], sys.argv[2], sys.argv[3])")


def kill_9_build_when(cfg: Path, raw: Path, out: Path, ready: Callable[[], bool], timeout_s: float = 150) -> set[int]:
    """Run ``build_umg41m(cfg, raw, out)`` in its own process session; once ``ready()`` holds, ``kill -9`` the whole
    session (the build, its Ray, the shard tasks). Returns the pids of its children seen while it ran."""
    import psutil

    env = {**os.environ, "PYTHONPATH": pythonpath_with_helpers()}
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(cfg), str(raw), str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    family: set[int] = set()
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline, "the build ended or hung before it was killed"
            family |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
            time.sleep(0.02)
        family |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    return family


def wait_gone(pids: set[int], timeout: float = 30.0) -> None:
    """Assert the processes ``pids`` (a killed build's children) end within ``timeout``; SIGKILL any left (they are
    the test's own) so they do not leak into other tests."""
    import psutil

    deadline = time.monotonic() + timeout
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in alive if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"}
        time.sleep(0.2)
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"processes outlived the killed build: {sorted(alive)}"
