"""All-gathers for the losses: row blocks of different sizes per rank, with gradients flowing back to their owners.

Every contrastive / tag term of ``model.losses`` needs the rows of all ranks as *columns* (the negatives, or
the shared tag vocabulary), while each rank computes only its own rows of the logit matrix (open_clip
``ClipLoss(local_loss=True, gather_with_grad=True)``). The gradient of rank q's rows with respect to the
columns rank r owns must reach rank r: the gather's backward sums every rank's column gradients
(a reduce-scatter on NCCL, an all-reduce on other backends) and hands each rank its own block.

Ranks may hold different numbers of rows (regions per rank differ): sizes are all-gathered first, blocks
are padded to the largest, and the result is cut back, rank-major. All kinds of rows a step gathers are
packed into **one** collective (:func:`gather_packed`), so every rank issues the same collectives in the
same order in forward and in backward, whatever its sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist


def world(group=None) -> tuple[int, int]:
    """(world size, rank) of ``group``; (1, 0) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), dist.get_rank(group)
    return 1, 0


class Gathered(NamedTuple):
    """One kind of rows after the gather.

    rows: (N, ...) all ranks' rows, rank-major; N = sum(sizes).
    offset: index of this rank's first row in ``rows`` (prefix sum of the sizes of the ranks before it).
    sizes: rows per rank.
    """

    rows: torch.Tensor
    offset: int
    sizes: list[int]


def _all_gather_padded(x: torch.Tensor, group) -> torch.Tensor:
    """(m, ...) equal-shaped blocks -> (W, m, ...), no autograd."""
    size, _ = world(group)
    blocks = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(blocks, x.contiguous(), group=group)
    return torch.stack(blocks)


class _AllGatherWithGrad(torch.autograd.Function):
    """(m, ...) -> (W, m, ...); backward: the sum over ranks of the gradient of this rank's block."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _all_gather_padded(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        _, rank = world(ctx.group)
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            out = grad.new_empty(grad.shape[1:])
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out, None
        total = grad.clone()  # gloo has no reduce-scatter: all-reduce and keep this rank's block
        dist.all_reduce(total, group=ctx.group)
        return total[rank], None


def _sizes(counts: Sequence[int], device: torch.device, group) -> torch.Tensor:
    """(K,) local counts -> (W, K) counts of every rank."""
    local = torch.tensor(list(counts), dtype=torch.long, device=device)
    return _all_gather_padded(local, group)


def gather_packed(parts: Sequence[torch.Tensor], group=None, with_grad: bool = True) -> list[Gathered]:
    """All-gather several kinds of rows in one collective.

    Args:
        parts: K tensors (n_k, E) (or (n_k,) for ``with_grad=False`` id vectors), one dtype and trailing shape.
        with_grad: gradients of the gathered rows flow back to the ranks that own them (see module doc).

    Returns:
        K :class:`Gathered`: for kind k, every rank's rows of that kind, rank-major. This rank's block of
        each is the input itself when the world is 1.
    """
    size, rank = world(group)
    if size == 1:
        return [Gathered(p, 0, [p.shape[0]]) for p in parts]
    counts = _sizes([p.shape[0] for p in parts], parts[0].device, group)  # (W, K)
    packed = torch.cat(list(parts), dim=0)
    longest = int(counts.sum(dim=1).max())
    padded = torch.cat([packed, packed.new_zeros((longest - packed.shape[0], *packed.shape[1:]))])
    blocks = _AllGatherWithGrad.apply(padded, group) if with_grad else _all_gather_padded(padded, group)
    starts = torch.cat([counts.new_zeros(size, 1), counts.cumsum(dim=1)], dim=1).tolist()  # (W, K + 1)
    sizes = counts.tolist()
    out = []
    for k in range(len(parts)):
        rows = torch.cat([blocks[q, starts[q][k]: starts[q][k + 1]] for q in range(size)])
        per_rank = [sizes[q][k] for q in range(size)]
        out.append(Gathered(rows, sum(per_rank[:rank]), per_rank))
    return out


class ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``factor`` (undoes DDP's average over ranks)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None
