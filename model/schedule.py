"""Optimizer and learning-rate schedule of the EVA-CLIP recipe the paper follows (§5.1).

- Parameter groups: image tower / text tower / the rest (``logit_scale``), each with its own learning
  rate, each split into weight-decay and no-decay parameters. No decay on anything 1-D (norms, biases,
  ``logit_scale``), nor on position and class embeddings (EVA-CLIP's ``no_weight_decay()`` sets:
  ``pos_embed``/``cls_token`` of its ViT, ``positional_embedding`` of its text tower). The token embedding
  *is* decayed, as in EVA-CLIP (its text tower's skip set leaves ``token_embedding`` out) and open_clip
  (only ``ndim < 2``, norms, biases and ``logit_scale`` are exempt there).
- Layer-wise learning-rate decay per tower (EVA-CLIP ``--visual-ld`` / ``--text-ld``, its
  ``get_num_layer_for_transformer``): embeddings are layer 0, block i is layer i + 1, everything after the
  blocks (final norm, projection) is layer depth + 1, and layer l trains at ``lr * ld ** (depth + 1 - l)``.
  ``ld = 1`` (the default) gives one group per tower and decay kind, as before.
- LAMB: ``model.lamb.Lamb``, with ``optim.lamb`` choosing DeepSpeed's ``FusedLamb`` math (what EVA-CLIP's
  pre-training ran; the paper configs) or timm's ``Lamb`` math, internal gradient-norm clipping off either
  way (the trainer clips once, globally, before the step, and DeepSpeed clips itself, so a config's
  ``grad_clip_norm`` means the same thing on every path), its per-tensor step compiled per ``optim.fused``.
- Linear warmup then cosine decay, evaluated per optimizer step as a ``LambdaLR`` factor on each
  group's base learning rate.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from data_schemas.train_config import OptimSection

NO_DECAY_NAMES = ("logit_scale", "logit_bias", "positional_embedding", "class_embedding", "pos_embed", "cls_token",
                  "reg_token")
#: Layer 0 of a tower (EVA-CLIP's list, plus open_clip ViT's ``class_embedding`` and timm's ``reg_token``).
EMBEDDING_NAMES = ("patch_embed", "pos_embed", "cls_token", "reg_token", "mask_token", "conv1", "class_embedding",
                   "positional_embedding", "token_embedding")
_BLOCK = re.compile(r"blocks\.([0-9]+)\.")  # timm ``blocks.i.``, open_clip ``resblocks.i.``


def _no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or any(part in name for part in NO_DECAY_NAMES)


def _tower(name: str) -> str:
    if name.startswith(("clip.visual.", "visual.")):
        return "visual"
    if name.endswith(("logit_scale", "logit_bias")):
        return "other"
    return "text"


def layer_id(name: str, depth: int) -> int:
    """EVA-CLIP's layer of a tower parameter: 0 embeddings, i + 1 for block i, ``depth + 1`` for the rest."""
    if any(part in name for part in EMBEDDING_NAMES):
        return 0
    match = _BLOCK.search(name)
    return int(match.group(1)) + 1 if match else depth + 1


def param_groups(model: nn.Module, optim: OptimSection) -> list[dict]:
    """Trainable parameters of a ``UMGCLIP`` in (tower x layer x decay) groups.

    Returns:
        ``[{"params", "lr", "weight_decay", "name", "tower"}]`` for the non-empty groups, in a fixed order
        (visual, text, other; layers ascending; decay before no-decay) so optimizer states line up on resume.
        Without layer decay the names are ``visual``, ``visual_no_decay``, …; with it ``visual_layer3``, ….
    """
    lrs = {"visual": optim.visual_lr or optim.lr, "text": optim.text_lr or optim.lr, "other": optim.lr}
    decays = {"visual": optim.visual_ld, "text": optim.text_ld, "other": 1.0}
    named = [(name, param, _tower(name)) for name, param in model.named_parameters() if param.requires_grad]
    depth = {tower: 1 + max((int(m.group(1)) for n, _, t in named if t == tower and (m := _BLOCK.search(n))),
                            default=-1) for tower in lrs}
    groups: dict[tuple[str, int, bool], list[torch.nn.Parameter]] = {}
    for name, param, tower in named:
        layer = layer_id(name, depth[tower]) if decays[tower] < 1 else depth[tower] + 1
        groups.setdefault((tower, layer, _no_decay(name, param)), []).append(param)
    out = []
    for (tower, layer, no_decay), params in sorted(groups.items(), key=lambda kv: (list(lrs).index(kv[0][0]),
                                                                                    *kv[0][1:])):
        scale = decays[tower] ** (depth[tower] + 1 - layer)
        suffix = f"_layer{layer}" if decays[tower] < 1 else ""
        out.append({"params": params, "lr": lrs[tower] * scale, "tower": tower,
                    "weight_decay": 0.0 if no_decay else optim.weight_decay,
                    "name": f"{tower}{suffix}{'_no_decay' if no_decay else ''}"})
    return out


def build_optimizer(model: nn.Module, optim: OptimSection) -> torch.optim.Optimizer:
    """LAMB (or AdamW) over :func:`param_groups`."""
    groups = param_groups(model, optim)
    if optim.name == "lamb":
        from model.lamb import Lamb

        return Lamb(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay,
                    fused=optim.fused, flavour=optim.lamb, trust_range=tuple(optim.lamb_trust_range))
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                             weight_decay=optim.weight_decay)


@dataclass
class WarmupCosine:
    """LR factor at optimizer step s: linear 1/w … 1 over ``warmup`` steps, then cosine from 1 to ``min_ratio``.

    A plain dataclass so ``LambdaLR.state_dict()`` stores its fields (floats, ints) and loads with
    ``weights_only=True``.
    """

    warmup: int
    total: int
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimSection, total_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step warmup + cosine; call ``.step()`` after every optimizer step."""
    factor = WarmupCosine(warmup=min(optim.warmup_steps, total_steps), total=total_steps,
                          min_ratio=optim.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
