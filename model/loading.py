"""Load a model for use, open_clip style: ``create_model_and_transforms(name_or_path)``.

``name_or_path`` is, in this order of checks:

- an **adapted checkpoint dir** (a directory holding ``adapt.json``): ``model.adapted.load_adapted``;
- a UMG-CLIP **run dir**, **checkpoint dir** or a **``.safetensors`` file** inside a checkpoint dir
  (``model.checkpoint.load_checkpoint``: towers from the saved open_clip config, weights from the file);
- an open_clip model **name**, ``NAME:PRETRAINED_TAG`` (tag or local open_clip weights file), or a
  ``local-dir:``/``hf-hub:`` name (random initialisation when no weights are given).

The model comes back in ``eval()`` mode. Token clustering is off in ``eval()`` (inference sees the full
token grid) unless ``cluster_in_eval=True``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
from PIL import Image
from torch import nn

from model.checkpoint import load_checkpoint
from model.factory import create_umg_clip, tokenizer_for
from model.preprocess import eval_transform

ADAPT_MARKER = "adapt.json"
_SCHEMAS = ("local-dir:", "hf-hub:")


def split_name(name: str) -> tuple[str, str | None]:
    """``"NAME:TAG"`` -> ``("NAME", "TAG")``; ``local-dir:``/``hf-hub:`` names and bare names get no tag."""
    if name.startswith(_SCHEMAS) or ":" not in name:
        return name, None
    base, tag = name.rsplit(":", 1)
    return base, tag or None


def _load(name_or_path: str, device: str | torch.device) -> nn.Module:
    path = Path(name_or_path)
    if path.is_dir() and (path / ADAPT_MARKER).exists():
        from model.adapted import load_adapted

        return load_adapted(path, device)
    if path.exists():
        return load_checkpoint(path, device=device)
    name, tag = split_name(name_or_path)
    if not name.startswith(_SCHEMAS) and open_clip.get_model_config(name) is None:
        raise FileNotFoundError(f"{name_or_path!r}: no such checkpoint path, and {name!r} is no open_clip model "
                                "name (see open_clip.list_models())")
    return create_umg_clip(name, pretrained=tag, device=device)


def create_model_and_transforms(name_or_path: str | Path, *, device: str | torch.device = "cpu",
                                cluster_in_eval: bool = False
                                ) -> tuple[nn.Module, Callable[[Image.Image], torch.Tensor], Callable]:
    """Model, single-image preprocess and tokenizer for a checkpoint path or open_clip name.

    Returns:
        ``(model, preprocess, tokenizer)``: the model in ``eval()`` on ``device`` (a ``UMGCLIP``, or an
        adapted dense model with ``.umg``); ``preprocess`` = :func:`model.preprocess.eval_transform`
        (PIL -> (3, S, S)); ``tokenizer`` = the open_clip tokenizer of the towers (list[str] -> (T, L)).

    Raises:
        FileNotFoundError: neither an existing checkpoint path nor a known model name.
    """
    model = _load(str(name_or_path), device).eval()
    umg = getattr(model, "umg", model)
    umg.cluster_in_eval = cluster_in_eval
    return model, eval_transform(model), tokenizer_for(umg)
