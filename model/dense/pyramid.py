"""ViTDet's simple feature pyramid (Li et al. 2022, detectron2 ``SimpleFeaturePyramid``) on a ViT token grid.

The single-scale grid (B, D, h, w) becomes four maps at 4×, 2×, 1× and ½× its resolution — strides
4/8/16/32 for a patch-16 tower, the layout Mask2Former's pixel decoder expects: two 2×2 transposed
convs (with LayerNorm + GELU between) for 4×, one for 2×, identity for 1×, 2×2 max-pool for ½×; then per
level a 1×1 conv to ``out_channels`` and a 3×3 conv, each followed by LayerNorm (as ViTDet).
"""

from __future__ import annotations

import torch
from timm.layers import LayerNorm2d
from torch import nn

SCALES = (4.0, 2.0, 1.0, 0.5)


def _resample(scale: float, dim: int) -> tuple[nn.Module, int]:
    if scale == 4.0:
        return nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2), nn.GELU(),
                             nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)), dim // 4
    if scale == 2.0:
        return nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), dim // 2
    if scale == 1.0:
        return nn.Identity(), dim
    if scale == 0.5:
        return nn.MaxPool2d(2), dim
    raise ValueError(f"pyramid scale {scale} not in {SCALES}")


class SimpleFeaturePyramid(nn.Module):
    """(B, D, h, w) -> [(B, C, 4h, 4w), (B, C, 2h, 2w), (B, C, h, w), (B, C, h/2, w/2)] (high to low res)."""

    def __init__(self, in_dim: int, out_channels: int):
        super().__init__()
        if in_dim % 4:
            raise ValueError(f"token width {in_dim} must be divisible by 4 for the 4x level")
        levels = []
        for scale in SCALES:
            resample, dim = _resample(scale, in_dim)
            levels.append(nn.Sequential(
                resample,
                nn.Conv2d(dim, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels)))
        self.levels = nn.ModuleList(levels)

    def forward(self, grid: torch.Tensor) -> list[torch.Tensor]:
        return [level(grid) for level in self.levels]
