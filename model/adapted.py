"""Adapted checkpoints: a directory with ``adapt.json`` + ``model.safetensors`` (``umg adapt`` writes them).

``adapt.json`` is :class:`data_schemas.adapt_config.AdaptedCheckpoint`: the task (``global`` or
``seg``), the base model's section and its full open_clip config (so the directory is
self-contained), the Convpass settings, the dense head's settings and the class names it was
trained on. ``model.safetensors`` holds the FULL weights of the returned module — the base's
(frozen, unchanged) plus the adapters (plus the dense head): one file, no dependency on the base
checkpoint, at the cost of a copy of the base weights (a B/16 tower: ~0.6 GB in fp32).

:func:`load_adapted` is what ``model.loading.create_model_and_transforms`` calls for a directory
holding ``adapt.json``: task ``global`` gives a :class:`~model.umg_clip.UMGCLIP` with Convpass inside
its image tower; task ``seg`` gives the dense model (``model.dense``) with ``.umg``,
``segment_semantic`` and ``segment_panoptic``.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

from data_schemas.adapt_config import AdaptedCheckpoint, AdaptedParameters, ConvpassSection
from data_schemas.train_config import ClusterSection, ModelSection
from model.checkpoint import (
    WEIGHTS,
    _without_random_init_warning,
    model_from_config,
    read_config,
    read_open_clip_config,
    resolve_checkpoint,
)
from model.convpass import ConvpassCfg, add_convpass, count_parameters
from model.factory import load_umg_checkpoint, save_umg_weights
from model.loading import ADAPT_MARKER as ADAPT_JSON
from model.loading import split_name
from model.umg_clip import UMGCLIP


@dataclass
class AdaptResult:
    """What ``umg adapt`` reports."""

    checkpoint: Path
    steps: int
    trainable_params: int
    total_params: int
    final_losses: dict[str, float]

    def summary(self) -> dict:
        return {"checkpoint": str(self.checkpoint), "steps": self.steps, "trainable_params": self.trainable_params,
                "total_params": self.total_params, "final_losses": self.final_losses}


def is_adapted_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPT_JSON).is_file()


def resolve_base(checkpoint: str | Path) -> tuple[ModelSection, dict | None, str]:
    """``--checkpoint`` of ``umg adapt`` -> (the base's model section with its weights, its saved open_clip
    config or None, a provenance string).

    Accepts a UMG-CLIP run dir, checkpoint dir or a ``.safetensors`` file in one (architecture from its
    ``config.json``), or an open_clip ``NAME`` / ``NAME:PRETRAINED_TAG``. Clustering is switched off:
    adapted models run on the full token grid.

    Raises:
        FileNotFoundError: neither a checkpoint nor a known open_clip model name.
        ValueError: the path is already an adapted checkpoint.
    """
    path = Path(checkpoint)
    if path.exists():
        if is_adapted_dir(path):
            raise ValueError(f"{path} is an adapted checkpoint already; adapt its base checkpoint instead")
        ckpt = resolve_checkpoint(path)
        section = read_config(ckpt).model.model_copy(
            update={"checkpoint": path if path.is_file() else ckpt / WEIGHTS, "pretrained": None,
                    "cluster": ClusterSection()})
        return section, read_open_clip_config(ckpt), str(ckpt.resolve())
    name, tag = split_name(str(checkpoint))
    if not name.startswith("local-dir:") and open_clip.get_model_config(name) is None:
        raise FileNotFoundError(f"{checkpoint}: not a UMG-CLIP checkpoint (run dir, checkpoint dir, {WEIGHTS}) "
                                "nor an open_clip model name")
    return ModelSection(name=name, pretrained=tag), None, str(checkpoint)


def convpass_cfg(section: ConvpassSection) -> ConvpassCfg:
    return ConvpassCfg(dim=section.dim, scale=section.scale, dropout=section.dropout)


def base_model(section: ModelSection, open_clip_config: dict | None, *, initial_weights: bool,
               device: str | torch.device = "cpu") -> UMGCLIP:
    """The base UMG-CLIP (towers from the saved open_clip config when there is one)."""
    quiet = nullcontext() if initial_weights else _without_random_init_warning()  # weights follow
    with quiet:
        return model_from_config(section, initial_weights=initial_weights, device=device,
                                 open_clip_config=open_clip_config)


def adapted_umg(meta: AdaptedCheckpoint, device: str | torch.device = "cpu") -> UMGCLIP:
    """The base architecture from ``meta`` with Convpass added (random weights; load them next)."""
    umg = base_model(meta.base_model, meta.open_clip_config, initial_weights=False, device=device)
    return add_convpass(umg, convpass_cfg(meta.convpass))


def save_adapted(out_dir: str | Path, model: nn.Module, meta: AdaptedCheckpoint) -> Path:
    """Write ``model.safetensors`` (full weights) and then ``adapt.json`` into ``out_dir``.

    ``adapt.json`` is written last (atomically), so a directory with it is complete.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_umg_weights(model, out_dir / WEIGHTS)
    tmp = out_dir / (ADAPT_JSON + ".tmp")
    tmp.write_text(meta.model_dump_json(indent=1), encoding="utf-8")
    os.replace(tmp, out_dir / ADAPT_JSON)
    return out_dir


def read_meta(checkpoint_dir: str | Path) -> AdaptedCheckpoint:
    path = Path(checkpoint_dir) / ADAPT_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint_dir}: no {ADAPT_JSON} (not an adapted checkpoint)")
    return AdaptedCheckpoint.model_validate_json(path.read_text(encoding="utf-8"))


def _build_global(meta: AdaptedCheckpoint, device) -> nn.Module:
    return adapted_umg(meta, device)


def _build_seg(meta: AdaptedCheckpoint, device) -> nn.Module:
    from model.dense.model import dense_model_from_meta  # lazy: transformers' Mask2Former modules

    return dense_model_from_meta(meta, adapted_umg(meta, device))


TASK_BUILDERS = {"global": _build_global, "seg": _build_seg}


def load_adapted(checkpoint_dir: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an adapted checkpoint (see module docstring); returns it in eval mode on ``device``."""
    meta = read_meta(checkpoint_dir)
    model = TASK_BUILDERS[meta.task](meta, device).to(device)
    load_umg_checkpoint(model, Path(checkpoint_dir) / WEIGHTS)
    return model.eval()


def parameters_of(model: nn.Module) -> AdaptedParameters:
    trainable, total = count_parameters(model)
    return AdaptedParameters(trainable=trainable, total=total)
