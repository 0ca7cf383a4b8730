"""AiluRus-style token clustering for cheaper high-resolution pre-training (paper §4.1).

After ``layer`` transformer blocks, the visual tokens of each image are clustered into
``keep = round(N * (1 - reduction))`` representative tokens (paper: 75 % of the tokens removed).
Only the prefix tokens (class/register) and the representatives pass the remaining blocks; at the
end every grid position takes the output of its representative ("unfold"), restoring the
(B, h, w, D) grid that RoIAlign needs.

Clustering is density-peak clustering with k-nearest-neighbour density (DPC-KNN, as in
AiluRus/TCFormer) on ``[normalise(feature), spatial_weight * normalised_xy]``, so a cluster groups
tokens that are similar AND close: a representative never mixes two far-apart objects that merely
look alike. Everything is batched tensor ops (``cdist``, ``topk``, stable sorts, one-hot matmuls);
there are no Python loops over tokens, and ties are broken by token index, so the result is
deterministic. Representatives are the uniform mean of their members (optionally weighted);
cluster assignment is discrete (no gradient), pooling and unfolding are differentiable.

Not in the paper (defaults are our choice, all config): ``layer``, ``k_neighbors``,
``spatial_weight``; no proportional-attention correction for cluster sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

# A block runner gets the current sequence (B, P + n, D) and, once clustering has happened, the grid
# index of each representative's centre token (B, K) (None before), so position-dependent blocks
# (e.g. EVA02's rotary embedding) can look up the representative's position.
BlockRunner = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class TokenClusterCfg:
    """Token clustering settings.

    Attributes:
        reduction: fraction of visual tokens removed, in [0, 0.9]; 0 disables clustering (paper: 0.75).
        layer: number of blocks that run on all tokens before clustering (0 = cluster the embeddings).
            Paper: not given; ours: 4, a third of a 12-block B/16 tower. Saved activations scale as
            ``layer + (depth - layer) * (1 - reduction)``: at 75 % reduction the paper's memory goal for
            high-resolution pre-training (>= 40 % less) needs ``layer <= 5`` of 12 (docs/training.md).
        k_neighbors: k of the kNN density estimate (AiluRus/TCFormer use 5).
        spatial_weight: weight λ of the normalised (x, y) position next to the unit-norm feature.
    """

    reduction: float = 0.0
    layer: int = 4
    k_neighbors: int = 5
    spatial_weight: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.reduction <= 0.9:
            raise ValueError(f"reduction must be in [0, 0.9], got {self.reduction}")
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0, got {self.layer}")
        if self.k_neighbors < 1:
            raise ValueError(f"k_neighbors must be >= 1, got {self.k_neighbors}")
        if self.spatial_weight < 0:
            raise ValueError(f"spatial_weight must be >= 0, got {self.spatial_weight}")

    def num_kept(self, num_tokens: int) -> int:
        """Number of representatives kept out of ``num_tokens`` visual tokens (at least 1)."""
        return max(1, min(num_tokens, round(num_tokens * (1.0 - self.reduction))))


class Clusters(NamedTuple):
    """Result of clustering N tokens into K representatives.

    center_idx: (B, K) long, grid index (row-major, 0..N-1) of each cluster's density peak, ascending.
    assign: (B, N) long, cluster (0..K-1) of every token; ``assign[b, center_idx[b, k]] == k``.
    """

    center_idx: torch.Tensor
    assign: torch.Tensor


def grid_positions(grid_hw: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """Row-major (y, x) positions of an h x w grid, each scaled to [0, 1]. Returns (h*w, 2) float32."""
    h, w = grid_hw
    ys = torch.arange(h, device=device, dtype=torch.float32) / max(h - 1, 1)
    xs = torch.arange(w, device=device, dtype=torch.float32) / max(w - 1, 1)
    return torch.cartesian_prod(ys, xs)


@torch.no_grad()
def density_peak_cluster(
    tokens: torch.Tensor,
    grid_hw: tuple[int, int],
    num_clusters: int,
    k_neighbors: int = 5,
    spatial_weight: float = 1.0,
) -> Clusters:
    """Cluster the visual tokens of each image with DPC-KNN on features + position.

    Args:
        tokens: (B, N, D) visual tokens in row-major grid order, N = h * w.
        grid_hw: (h, w) of the token grid.
        num_clusters: K, 1 <= K <= N.
        k_neighbors: k of the density ρ_i = exp(-mean of the k smallest squared distances).
        spatial_weight: λ in z_i = [f_i / |f_i|, λ * (y_i, x_i)].

    Returns:
        :class:`Clusters` with centre indices (B, K) and assignments (B, N).
    """
    b, n, _ = tokens.shape
    if n != grid_hw[0] * grid_hw[1]:
        raise ValueError(f"{n} tokens do not fill a {grid_hw[0]}x{grid_hw[1]} grid")
    if not 1 <= num_clusters <= n:
        raise ValueError(f"num_clusters must be in [1, {n}], got {num_clusters}")
    feats = F.normalize(tokens.float(), dim=-1)
    pos = grid_positions(grid_hw, tokens.device).expand(b, -1, -1)
    points = torch.cat([feats, spatial_weight * pos], dim=-1)
    dist = torch.cdist(points, points)  # (B, N, N)

    knn_dist = dist.topk(min(k_neighbors, n), dim=-1, largest=False).values
    density = (-(knn_dist**2).mean(dim=-1)).exp()  # (B, N)
    # A strict total order on density (ties: lower index counts as denser) keeps everything deterministic.
    order = torch.sort(density, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=tokens.device).expand(b, -1))
    denser = rank.unsqueeze(1) < rank.unsqueeze(2)  # [b, i, j]: j ranks above i
    dist_max = dist.flatten(1).max(dim=-1).values[:, None, None]
    # δ_i: distance to the nearest denser token (the densest token gets the largest distance).
    delta = torch.where(denser, dist, dist_max).min(dim=-1).values
    score = density * delta
    top = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :num_clusters]
    center_idx = top.sort(dim=-1).values

    to_centers = dist.gather(2, center_idx.unsqueeze(1).expand(-1, n, -1))  # (B, N, K)
    assign = to_centers.argmin(dim=-1)  # first minimum on ties
    # A centre always belongs to its own cluster, so no cluster is empty.
    assign.scatter_(1, center_idx, torch.arange(num_clusters, device=tokens.device).expand(b, -1))
    return Clusters(center_idx=center_idx, assign=assign)


def merge_tokens(tokens: torch.Tensor, assign: torch.Tensor, num_clusters: int,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """Pool tokens into their cluster representatives (weighted mean).

    Args:
        tokens: (B, N, D).
        assign: (B, N) cluster index of each token.
        num_clusters: K.
        weights: optional (B, N) non-negative token weights; uniform if None.

    Returns:
        (B, K, D) representatives.
    """
    # One-hot matmul instead of scatter_add: deterministic on GPU, and fast for N, K in the hundreds.
    member = F.one_hot(assign, num_clusters).to(tokens.dtype)  # (B, N, K)
    if weights is not None:
        member = member * weights.to(tokens.dtype).unsqueeze(-1)
    total = member.sum(dim=1).clamp_min(torch.finfo(tokens.dtype).tiny).unsqueeze(-1)  # (B, K, 1)
    return member.transpose(1, 2) @ tokens / total


def unfold_tokens(representatives: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """Give every position its representative's value. (B, K, D), (B, N) -> (B, N, D).

    A one-hot matmul rather than ``gather``: its backward is deterministic on GPU (gather's is a
    scatter_add), and the forward is still exact (one term of 1 * value, the rest exact zeros).
    """
    member = F.one_hot(assign, representatives.shape[1]).to(representatives.dtype)  # (B, N, K)
    return member @ representatives


def run_blocks_with_clustering(
    blocks: Sequence[BlockRunner],
    x: torch.Tensor,
    num_prefix: int,
    grid_hw: tuple[int, int],
    cfg: TokenClusterCfg | None,
) -> tuple[torch.Tensor, list[int]]:
    """Run transformer blocks, clustering the visual tokens after ``cfg.layer`` of them.

    Args:
        blocks: block runners, in order (see :data:`BlockRunner`).
        x: (B, P + N, D) prefix tokens followed by the N = h * w visual tokens in row-major order.
        num_prefix: P, the class/register tokens that are never clustered.
        grid_hw: (h, w).
        cfg: clustering settings; None or ``reduction`` giving K == N runs the plain blocks unchanged.

    Returns:
        (B, P + N, D) output with the visual tokens unfolded back to the full grid, and the sequence
        length each block saw (P + N before clustering, P + K after).
    """
    n = x.shape[1] - num_prefix
    keep = cfg.num_kept(n) if cfg is not None else n
    if keep < n and cfg.layer > len(blocks):
        raise ValueError(f"cluster layer {cfg.layer} exceeds the {len(blocks)} blocks of the tower")
    split = cfg.layer if keep < n else len(blocks)
    seq_lens = []
    for run in blocks[:split]:
        seq_lens.append(x.shape[1])
        x = run(x, None)
    if split == len(blocks):
        return x, seq_lens

    prefix, visual = x[:, :num_prefix], x[:, num_prefix:]
    clusters = density_peak_cluster(visual, grid_hw, keep, cfg.k_neighbors, cfg.spatial_weight)
    x = torch.cat([prefix, merge_tokens(visual, clusters.assign, keep)], dim=1)
    for run in blocks[split:]:
        seq_lens.append(x.shape[1])
        x = run(x, clusters.center_idx)
    visual = unfold_tokens(x[:, num_prefix:], clusters.assign)
    return torch.cat([x[:, :num_prefix], visual], dim=1), seq_lens
