"""Convpass parameter-efficient tuning (paper §4.2; Jie & Deng 2022, github.com/JieShibo/PETL-ViT).

Every ViT block of the image tower gets two Convpass adapters, in parallel with its attention and
with its MLP::

    X'  = X  + Attn(LN1(X))  + s · Convpass(LN1(X))
    X'' = X' + MLP(LN2(X'))  + s · Convpass(LN2(X'))          s = 0.1 (paper)

Convpass restores the visual tokens to their 2-D grid and runs 1×1 conv (D -> d) -> GELU -> 3×3
conv (d -> d) -> GELU -> 1×1 conv (d -> D). The 1×1 convs are ``nn.Linear`` on the tokens (the
same operation, as upstream). Prefix tokens (class token, EVA register tokens) follow upstream
Convpass: each is run through the 3×3 conv as a 1×1 image (zero padding, so only the kernel's
centre tap acts on it). Initialisation as upstream: down projection xavier-uniform, 3×3 conv zero
with the identity at its centre tap, up projection zero — so an adapted model starts exactly equal
to its base. Upstream defaults kept: hidden width d = 8, dropout 0.1 before the up projection;
the activation is ``nn.GELU`` as the paper writes (upstream uses QuickGELU).

The adapters sit inside the blocks as ``adapter_attn`` / ``adapter_mlp`` submodules (the block's
``forward`` is rebound, as upstream's ``set_Convpass`` does), so the base weights keep their
names and an adapted state dict is the base's plus ``*.adapter_*`` keys. The grid size is recorded
by a forward hook on the patch embedding at every forward, so any input resolution the tower
accepts works (also through plain ``clip.encode_image``). Token clustering changes the token count
after some blocks; Convpass needs the full grid, so it refuses a clustered model.

Supported blocks (a registry keyed by block class): open_clip ``ResidualAttentionBlock``
(ln_1/attn/ls_1/ln_2/mlp/ls_2) and timm ``EvaBlock`` (norm1/attn(rope=...)/gamma_1/norm2/mlp/gamma_2).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import MethodType

import torch
from open_clip.transformer import ResidualAttentionBlock
from timm.models.eva import EvaBlock
from torch import nn

from model.umg_clip import UMGCLIP, OpenClipViTTokens, TimmEvaTokens

ADAPTER_NAMES = ("adapter_attn", "adapter_mlp")


@dataclass(frozen=True)
class ConvpassCfg:
    """Convpass settings.

    Attributes:
        dim: hidden width d of the adapter (upstream: 8).
        scale: s, the adapter branch's weight (paper: 0.1).
        dropout: dropout before the up projection (upstream: 0.1).
    """

    dim: int = 8
    scale: float = 0.1
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"convpass dim must be >= 1, got {self.dim}")


class TokenGrid:
    """The (h, w) token grid of the current forward, recorded by a hook on the patch embedding."""

    def __init__(self, num_prefix: int):
        self.num_prefix = num_prefix
        self.hw: tuple[int, int] | None = None
        self.enabled = True  # False: every adapter adds nothing (the frozen base model), see convpass_disabled

    def record(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        """Forward hook: (B, D, h, w) conv output, or a timm ``PatchEmbed`` with a fixed ``grid_size``."""
        self.hw = tuple(output.shape[-2:]) if output.ndim == 4 else tuple(module.grid_size)


class Convpass(nn.Module):
    """One Convpass adapter, scaled by ``s``: (B, P + h·w, D) -> (B, P + h·w, D)."""

    def __init__(self, width: int, grid: TokenGrid, cfg: ConvpassCfg):
        super().__init__()
        self.down = nn.Linear(width, cfg.dim)  # = 1×1 conv D -> d
        self.conv = nn.Conv2d(cfg.dim, cfg.dim, 3, padding=1)
        self.up = nn.Linear(cfg.dim, width)  # = 1×1 conv d -> D
        self.act = nn.GELU()
        self.dropout = nn.Dropout(cfg.dropout)
        self.scale = cfg.scale
        self.grid = grid  # shared, not a module
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, :, 1, 1] = torch.eye(cfg.dim)
        nn.init.zeros_(self.conv.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.grid.enabled:
            return x.new_zeros(())
        b, n, _ = x.shape
        p = self.grid.num_prefix
        if self.grid.hw is None:
            raise RuntimeError("Convpass: no token grid recorded; run the tower from its patch embedding")
        h, w = self.grid.hw
        if n != p + h * w:
            raise RuntimeError(
                f"Convpass needs the full token grid ({p} prefix + {h}x{w} tokens), got {n} tokens: token "
                "clustering (or patch dropout) is on; adapted models run on the unclustered grid")
        z = self.act(self.down(x))  # (B, N, d)
        d = z.shape[-1]
        patches = self.conv(z[:, p:].transpose(1, 2).reshape(b, d, h, w)).flatten(2).transpose(1, 2)
        prefix = self.conv(z[:, :p].reshape(b * p, d, 1, 1)).reshape(b, p, d)  # each a 1×1 image
        z = self.dropout(self.act(torch.cat([prefix, patches], dim=1)))
        return self.scale * self.up(z)


def _open_clip_block_forward(self, q_x: torch.Tensor, k_x: torch.Tensor | None = None,
                             v_x: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``ResidualAttentionBlock.forward`` with the two Convpass branches (self-attention only)."""
    if k_x is not None or v_x is not None:
        raise NotImplementedError("Convpass on cross-attention blocks")
    h = self.ln_1(q_x)
    x = q_x + self.ls_1(self.attention(q_x=h, attn_mask=attn_mask)) + self.adapter_attn(h)
    h = self.ln_2(x)
    return x + self.ls_2(self.mlp(h)) + self.adapter_mlp(h)


def _eva_block_forward(self, x: torch.Tensor, rope: torch.Tensor | None = None,
                       attn_mask: torch.Tensor | None = None, **attn_kwargs) -> torch.Tensor:
    """``timm EvaBlock.forward`` with the two Convpass branches (drop-path on them, as upstream)."""
    h = self.norm1(x)
    x_attn = self.attn(h, rope=rope, attn_mask=attn_mask, **attn_kwargs)
    if self.gamma_1 is not None:
        x_attn = self.gamma_1 * x_attn
    x = x + self.drop_path1(x_attn) + self.drop_path1(self.adapter_attn(h))
    h = self.norm2(x)
    x_mlp = self.mlp(h)
    if self.gamma_2 is not None:
        x_mlp = self.gamma_2 * x_mlp
    return x + self.drop_path2(x_mlp) + self.drop_path2(self.adapter_mlp(h))


BLOCK_FORWARDS: dict[type, Callable] = {
    ResidualAttentionBlock: _open_clip_block_forward,
    EvaBlock: _eva_block_forward,
}


def _open_clip_parts(tokens: OpenClipViTTokens) -> tuple[nn.ModuleList, nn.Module, int]:
    v = tokens.visual
    return v.transformer.resblocks, v.conv1, v.conv1.out_channels


def _eva_parts(tokens: TimmEvaTokens) -> tuple[nn.ModuleList, nn.Module, int]:
    # the patch conv (B, D, h, w): its output gives the grid at any input size (timm's PatchEmbed keeps a fixed one)
    return tokens.trunk.blocks, tokens.trunk.patch_embed.proj, tokens.trunk.embed_dim


TOWER_PARTS: dict[type, Callable] = {OpenClipViTTokens: _open_clip_parts, TimmEvaTokens: _eva_parts}


def add_convpass(umg: UMGCLIP, cfg: ConvpassCfg = ConvpassCfg()) -> UMGCLIP:
    """Put Convpass adapters into every block of ``umg``'s image tower and freeze everything else.

    Returns the same model (modified in place): only ``*.adapter_attn.*`` / ``*.adapter_mlp.*``
    parameters require grad. Heads added afterwards (the dense model) bring their own trainable
    parameters.

    Raises:
        ValueError: the model runs with token clustering, or already has adapters.
        NotImplementedError: a tower or block type without a Convpass registry entry.
    """
    if umg.cluster is not None and umg.cluster.reduction > 0:
        raise ValueError("Convpass needs the full token grid: build the model with token clustering off "
                         "(cluster reduction 0) to adapt it")
    if has_convpass(umg):
        raise ValueError("the model already has Convpass adapters")
    parts = TOWER_PARTS.get(type(umg.tokens))
    if parts is None:
        raise NotImplementedError(f"Convpass for token adapter {type(umg.tokens).__name__}")
    blocks, patch_embed, width = parts(umg.tokens)
    grid = TokenGrid(umg.tokens.num_prefix)
    umg.requires_grad_(False)
    for block in blocks:
        forward = BLOCK_FORWARDS.get(type(block))
        if forward is None:
            raise NotImplementedError(f"Convpass for block type {type(block).__name__}; known: "
                                      f"{sorted(t.__name__ for t in BLOCK_FORWARDS)}")
        ref = next(block.parameters())
        for name in ADAPTER_NAMES:
            setattr(block, name, Convpass(width, grid, cfg).to(device=ref.device, dtype=ref.dtype))
        block.forward = MethodType(forward, block)
    patch_embed.register_forward_hook(grid.record)  # a bound method: deepcopy keeps it tied to the copy
    return umg


@contextmanager
def convpass_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its frozen base: every Convpass branch adds exactly zero inside the block."""
    grids = {id(m.grid): m.grid for m in model.modules() if isinstance(m, Convpass)}.values()
    for grid in grids:
        grid.enabled = False
    try:
        yield
    finally:
        for grid in grids:
            grid.enabled = True


def has_convpass(model: nn.Module) -> bool:
    """Whether any module of ``model`` is a Convpass adapter."""
    return any(isinstance(m, Convpass) for m in model.modules())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of ``model``."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
