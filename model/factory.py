"""Model registry and construction: a UMG-CLIP variant is an open_clip JSON config.

``model/configs/*.json`` (open_clip's config format) are registered with
``open_clip.add_model_config`` on import, so ``create_umg_clip("umg-tiny-vit")`` and open_clip's own
names (``"EVA02-B-16"``, ``"EVA02-L-14"``, ``"ViT-B-16"`` …) resolve the same way, as does
``"local-dir:/path"``. Adding a model = adding a JSON file.

Every model remembers its resolved open_clip config (``UMGCLIP.open_clip_config``: open_clip's
``{"model_cfg", "preprocess_cfg"}`` layout, as in a ``local-dir:`` folder's ``open_clip_config.json``);
checkpoints store it, and :func:`register_config` turns it back into a buildable name, so a model made
from ``local-dir:DIR`` or an unregistered config still loads after DIR is gone.

Weights: ``pretrained`` is an open_clip tag or a local open_clip checkpoint file (``.safetensors``,
or a torch file read with ``weights_only=True``); ``checkpoint`` is a UMG-CLIP state dict saved by
:func:`save_umg_weights` or a trainer checkpoint holding one under ``"model"``/``"state_dict"``.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import open_clip
import torch

from model.token_cluster import TokenClusterCfg
from model.umg_clip import UMGCLIP

CONFIG_DIR = Path(__file__).with_name("configs")
open_clip.add_model_config(CONFIG_DIR)


def list_models() -> list[str]:
    """Names of the configs in ``model/configs`` (open_clip's built-ins work too)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def get_tokenizer(model_name: str):
    """The open_clip tokenizer for a model name (context length from its config)."""
    return open_clip.get_tokenizer(model_name)


def register_config(open_clip_config: dict) -> str:
    """Register a saved ``{"model_cfg", "preprocess_cfg"}`` config with open_clip; returns its name.

    The name is ``umg-saved-<hash of model_cfg>`` (same config, same name), registered through
    ``open_clip.add_model_config`` from a temporary file (the registry keeps it after the file is gone).
    """
    model_cfg = open_clip_config["model_cfg"]
    text = json.dumps(model_cfg, sort_keys=True)
    name = "umg-saved-" + hashlib.sha256(text.encode()).hexdigest()[:16]
    if open_clip.get_model_config(name) is None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.json"
            path.write_text(text, encoding="utf-8")
            open_clip.add_model_config(path)
    return name


def tokenizer_for(model: UMGCLIP):
    """The tokenizer of a built model, from its own saved config (works for any name it was built from)."""
    if model.open_clip_config is None:
        raise ValueError("model has no open_clip_config (not built by create_umg_clip); use get_tokenizer(name)")
    return open_clip.get_tokenizer(register_config(model.open_clip_config))


def create_umg_clip(
    model_name: str,
    pretrained: str | None = None,
    *,
    checkpoint: str | Path | None = None,
    cluster: TokenClusterCfg | None = None,
    region_output_size: int = 1,
    image_size: int | None = None,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    preprocess_cfg: dict | None = None,
) -> UMGCLIP:
    """Build a UMG-CLIP model.

    Args:
        model_name: registered open_clip config name (ours or built-in) or ``local-dir:`` path.
        pretrained: open_clip tag or local open_clip checkpoint (initial CLIP weights, e.g. EVA-CLIP).
        checkpoint: UMG-CLIP weights to load after construction (see :func:`load_umg_checkpoint`).
        cluster: token clustering settings (None = off).
        region_output_size: RoIAlign output side for region embeddings.
        image_size: input side overriding the config's (e.g. 448 for EVA02-B-16; pretrained position
            embeddings are resampled by open_clip / timm, EVA02's RoPE is rebuilt for the new grid).
        precision, device: as in ``open_clip.create_model``.
        preprocess_cfg: overrides of the image preprocessing config (``force_preprocess_cfg``), e.g. a
            checkpoint's saved one.

    Returns:
        :class:`UMGCLIP` on ``device``; ``open_clip_config`` holds the resolved config.
    """
    cfg = open_clip.get_model_config(model_name) or {}
    vision_cfg = cfg.get("vision_cfg", {})
    force_image_size = image_size
    if force_image_size is None and vision_cfg.get("timm_model_name") and vision_cfg.get("image_size"):
        # open_clip builds timm towers at the timm default size and only resizes on force_image_size.
        force_image_size = vision_cfg["image_size"]
    clip = open_clip.create_model(model_name, pretrained=pretrained, precision=precision, device=device,
                                  force_image_size=force_image_size, force_preprocess_cfg=preprocess_cfg,
                                  weights_only=True)
    model = UMGCLIP(clip, cluster=cluster, region_output_size=region_output_size)
    if cfg:
        if image_size is not None:  # the saved config describes the towers as built
            cfg = {**cfg, "vision_cfg": {**vision_cfg, "image_size": image_size}}
        model.open_clip_config = json.loads(json.dumps(  # plain JSON values (tuples -> lists)
            {"model_cfg": cfg, "preprocess_cfg": dict(clip.visual.preprocess_cfg)}))
    if checkpoint is not None:
        load_umg_checkpoint(model, checkpoint)
    return model


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_umg_checkpoint(model: UMGCLIP, path: str | Path, strict: bool = True):
    """Load UMG-CLIP weights (safetensors, or torch with ``weights_only=True``) into ``model``.

    Returns:
        ``load_state_dict``'s missing/unexpected keys.
    """
    return model.load_state_dict(_read_state_dict(path), strict=strict)


def save_umg_weights(model: UMGCLIP, path: str | Path) -> None:
    """Save the model's weights as safetensors (contiguous CPU copies)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
