"""Optimizer and learning-rate schedule of the EVA-CLIP recipe the paper follows (§5.1).

- Parameter groups: image tower / text tower / the rest (``logit_scale``), each with its own learning
  rate, each split into weight-decay and no-decay parameters. No decay on anything 1-D (norms, biases,
  ``logit_scale``), nor on position / class / token embeddings (open_clip's and timm's
  ``no_weight_decay`` convention).
- LAMB (``timm.optim.Lamb``) with its internal gradient-norm clipping off: the trainer clips once,
  globally, before the step (and DeepSpeed clips itself), so a config's ``grad_clip_norm`` means
  the same thing on every path.
- Linear warmup then cosine decay, evaluated per optimizer step as a ``LambdaLR`` factor on each
  group's base learning rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from data_schemas.train_config import OptimSection

NO_DECAY_NAMES = ("logit_scale", "logit_bias", "positional_embedding", "class_embedding", "pos_embed", "cls_token",
                  "token_embedding", "reg_token")


def _no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or any(part in name for part in NO_DECAY_NAMES)


def _tower(name: str) -> str:
    if name.startswith(("clip.visual.", "visual.")):
        return "visual"
    if name.endswith(("logit_scale", "logit_bias")):
        return "other"
    return "text"


def param_groups(model: nn.Module, optim: OptimSection) -> list[dict]:
    """Trainable parameters of a ``UMGCLIP`` in (tower x decay) groups.

    Returns:
        ``[{"params", "lr", "weight_decay", "name"}]`` for the non-empty groups, in a fixed order
        (visual, text, other; decay before no-decay) so optimizer states line up on resume.
    """
    lrs = {"visual": optim.visual_lr or optim.lr, "text": optim.text_lr or optim.lr, "other": optim.lr}
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((_tower(name), _no_decay(name, param)), []).append(param)
    out = []
    for tower in ("visual", "text", "other"):
        for no_decay in (False, True):
            params = groups.get((tower, no_decay))
            if params:
                out.append({"params": params, "lr": lrs[tower], "weight_decay": 0.0 if no_decay else optim.weight_decay,
                            "name": f"{tower}{'_no_decay' if no_decay else ''}"})
    return out


def build_optimizer(model: nn.Module, optim: OptimSection) -> torch.optim.Optimizer:
    """LAMB (or AdamW) over :func:`param_groups`."""
    groups = param_groups(model, optim)
    if optim.name == "lamb":
        from timm.optim import Lamb

        return Lamb(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay,
                    max_grad_norm=None)
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
