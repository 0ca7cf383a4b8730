"""Training checkpoints: safetensors weights + a ``weights_only``-loadable training state.

A run directory (``train(..., out_dir)``) holds::

    checkpoints/step_00000100/model.safetensors   UMG-CLIP weights (``save_umg_weights``)
    checkpoints/step_00000100/train_state.pt      step, epoch, per-rank data position and RNG states,
                                                  optimizer + scheduler state dicts (torch.save)
    checkpoints/step_00000100/config.json         the TrainConfig of the run (clustering, RoIAlign size, ...)
    checkpoints/step_00000100/open_clip_config.json  the resolved open_clip config ({"model_cfg",
                                                  "preprocess_cfg"}): rebuilds the towers without the
                                                  name's source (a moved local-dir:, an unregistered config)
    checkpoints/step_00000100/deepspeed/          DeepSpeed engine state (ZeRO partitions), DeepSpeed runs only
    checkpoints/latest                            name of the newest complete checkpoint

A checkpoint is written under ``step_N.tmp`` and renamed when complete, and ``latest`` is replaced
atomically after that, so a killed run always resumes from a whole checkpoint. Everything in
``train_state.pt`` is tensors, numbers, strings, lists and dicts (RNG states converted), so it loads
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from data_schemas.train_config import ModelSection, TrainConfig
from model.factory import create_umg_clip, load_umg_checkpoint, register_config, save_umg_weights
from model.token_cluster import TokenClusterCfg
from model.umg_clip import UMGCLIP

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
WEIGHTS = "model.safetensors"
STATE = "train_state.pt"
CONFIG = "config.json"
OPEN_CLIP_CONFIG = "open_clip_config.json"
DEEPSPEED = "deepspeed"


def cluster_cfg(section: ModelSection) -> TokenClusterCfg | None:
    """The model's token clustering settings (None when off)."""
    c = section.cluster
    if c.reduction == 0:
        return None
    return TokenClusterCfg(reduction=c.reduction, layer=c.layer, k_neighbors=c.k_neighbors,
                           spatial_weight=c.spatial_weight)


def model_from_config(section: ModelSection, *, initial_weights: bool = True,
                      device: str | torch.device = "cpu", open_clip_config: dict | None = None) -> UMGCLIP:
    """Build the run's model; ``initial_weights`` loads ``pretrained`` / ``checkpoint`` (off when a
    checkpoint's own weights follow anyway). ``open_clip_config`` (a checkpoint's saved config) replaces
    ``section.name`` as the source of the architecture."""
    name = section.name if open_clip_config is None else register_config(open_clip_config)
    model = create_umg_clip(
        name,
        pretrained=section.pretrained if initial_weights else None,
        checkpoint=section.checkpoint if initial_weights else None,
        cluster=cluster_cfg(section),
        region_output_size=section.region_output_size,
        image_size=section.image_size,
        device=device,
        preprocess_cfg=None if open_clip_config is None else open_clip_config["preprocess_cfg"],
    )
    if section.grad_checkpointing:
        model.clip.set_grad_checkpointing(True)
    return model


def rng_state() -> dict:
    """This process's torch / CUDA / python / numpy RNG states as tensors and plain values."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: UMGCLIP,
    config: TrainConfig,
    state: dict,
    *,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
    engine=None,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint ``step`` of ``run_dir`` and point ``latest`` at it. Every rank calls this.

    Args:
        model: the unwrapped model (rank 0 saves its weights; ZeRO-1/2 keep them whole on every rank).
        state: the training state for ``train_state.pt`` (see module docstring).
        barrier: synchronises ranks (no-op in one process).
        engine: a DeepSpeed engine; all ranks write their partitions under ``deepspeed/``.

    Returns:
        The final checkpoint directory.
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    tmp = final.with_name(final.name + ".tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    if engine is not None:
        engine.save_checkpoint(str(tmp / DEEPSPEED), tag="state", save_latest=False)
        barrier()
    if is_main:
        save_umg_weights(model, tmp / WEIGHTS)
        torch.save(state, tmp / STATE)
        (tmp / CONFIG).write_text(config.model_dump_json(indent=1), encoding="utf-8")
        if model.open_clip_config is not None:
            (tmp / OPEN_CLIP_CONFIG).write_text(json.dumps(model.open_clip_config, indent=1), encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, final.name)
        _prune(root, keep_last)
        log.info("saved checkpoint %s", final)
    barrier()
    return final


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory of a run, or None."""
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text(encoding="utf-8").strip()
    return path if (path / WEIGHTS).exists() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir, a checkpoint dir or a ``.safetensors`` file in one -> the checkpoint dir.

    Raises:
        FileNotFoundError: naming the path when it holds no checkpoint.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent
    if (path / WEIGHTS).exists() and (path / CONFIG).exists():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path}: no checkpoint ({WEIGHTS} + {CONFIG}, or a run dir with {CHECKPOINTS}/)")
    return latest


def read_config(checkpoint_dir: Path) -> TrainConfig:
    return TrainConfig.model_validate_json((Path(checkpoint_dir) / CONFIG).read_text(encoding="utf-8"))


def load_train_state(checkpoint_dir: Path) -> dict:
    """``train_state.pt`` of a checkpoint, loaded with ``weights_only=True`` on the CPU."""
    return torch.load(Path(checkpoint_dir) / STATE, map_location="cpu", weights_only=True)


@contextmanager
def _without_random_init_warning() -> Iterator[None]:
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" (logged to the root logger)."""
    def keep(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def read_open_clip_config(checkpoint_dir: Path) -> dict | None:
    """The checkpoint's saved open_clip config, or None (checkpoints written before it existed)."""
    path = Path(checkpoint_dir) / OPEN_CLIP_CONFIG
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def load_checkpoint(path_or_run_dir: str | Path, device: str | torch.device = "cpu") -> UMGCLIP:
    """Rebuild a trained UMG-CLIP from a run dir, a checkpoint dir or a ``.safetensors`` file in one.

    The towers come from the checkpoint's ``open_clip_config.json`` (older checkpoints: the model name
    in ``config.json``), token clustering and RoIAlign size from ``config.json``; no pretrained weights
    are fetched. The weights are ``model.safetensors``, or the given ``.safetensors`` file. Returns the
    model in eval mode on ``device``.
    """
    path = Path(path_or_run_dir)
    ckpt = resolve_checkpoint(path)
    with _without_random_init_warning():  # the checkpoint's weights follow
        model = model_from_config(read_config(ckpt).model, initial_weights=False, device=device,
                                  open_clip_config=read_open_clip_config(ckpt))
    load_umg_checkpoint(model, path if path.is_file() else ckpt / WEIGHTS)
    return model.eval()
