"""Row-wise logsumexp of ``scale * rows @ columns.T`` streamed over column chunks (online logsumexp).

The contrastive terms of ``model.losses`` need, per local row i, ``lse_i = logsumexp_j(s * r_i . c_j)`` over
every column of the global batch. Built whole, that is an (n, N) logit matrix per direction plus the
softmax and gradient buffers of the same size; for the region term of a paper-scale run (5,120 local rows x
163,840 regions: 3.1 GiB per fp32 matrix) it does not fit beside the towers. Here the forward walks the
columns in chunks of ``chunk`` and folds each chunk into a running ``lse`` (``logaddexp``, the online
logsumexp); only the (n,) result is saved. The backward walks the chunks again, recomputing each chunk's
logits and its softmax ``p_ij = exp(l_ij - lse_i)``:

    d/dr_i = s * sum_j g_i p_ij c_j,    d/dc_j = s * sum_i g_i p_ij r_i,    d/ds = sum_ij g_i p_ij (r_i . c_j)

so memory is O(n x chunk) at any N, for one extra pass of matrix products (FlashAttention's trade).

Masking (``model.losses``' ``mask`` mode for identical captions): with ``row_group`` / ``column_group``
(text-group index per row / column) and ``own_column`` (the row's positive column), a column of the row's
group other than its own is left out of the row's logsumexp, exactly as the unchunked path fills it with
``-inf``. Sums run in float32 for float32 / bf16 / fp16 inputs (float64 for float64).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _sum_dtype(t: Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs."""
    return torch.promote_types(t.dtype, torch.float32)


def _chunk_dots(rows: Tensor, columns: Tensor, start: int, chunk: int) -> tuple[Tensor, slice]:
    """``rows @ columns[start:start + chunk].T`` in the sum dtype, and the column slice."""
    cols = slice(start, min(start + chunk, columns.shape[0]))
    dtype = _sum_dtype(rows)
    return rows.to(dtype) @ columns[cols].to(dtype).T, cols


def _mask(row_group: Tensor | None, column_group: Tensor | None, own_column: Tensor | None, cols: slice
          ) -> Tensor | None:
    """(n, c) bool: True where column j of the chunk shares row i's text group and is not its own column."""
    if row_group is None:
        return None
    same = row_group[:, None] == column_group[None, cols]
    return same & (own_column[:, None] != torch.arange(cols.start, cols.stop, device=same.device)[None, :])


class _StreamedLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, columns, scale, chunk, row_group, column_group, own_column):
        lse = rows.new_full((rows.shape[0],), -torch.inf, dtype=_sum_dtype(rows))
        for start in range(0, columns.shape[0], chunk):
            dots, cols = _chunk_dots(rows, columns, start, chunk)
            logits = dots * scale.to(dots.dtype)
            mask = _mask(row_group, column_group, own_column, cols)
            if mask is not None:
                logits = logits.masked_fill_(mask, -torch.inf)
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
        ctx.chunk = chunk
        ctx.save_for_backward(rows, columns, scale, lse, *(t for t in (row_group, column_group, own_column)
                                                             if t is not None))
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        rows, columns, scale, lse, *groups = ctx.saved_tensors
        row_group, column_group, own_column = groups if groups else (None, None, None)
        dtype = _sum_dtype(rows)
        s = scale.to(dtype)
        grad_rows = torch.zeros(rows.shape, dtype=dtype, device=rows.device)
        grad_columns = torch.empty(columns.shape, dtype=dtype, device=columns.device)
        grad_scale = torch.zeros((), dtype=dtype, device=rows.device)
        for start in range(0, columns.shape[0], ctx.chunk):
            dots, cols = _chunk_dots(rows, columns, start, ctx.chunk)
            weights = torch.exp(dots * s - lse[:, None]) * grad_lse[:, None].to(dtype)  # g_i p_ij, (n, c)
            mask = _mask(row_group, column_group, own_column, cols)
            if mask is not None:
                weights = weights.masked_fill_(mask, 0.0)
            grad_rows.addmm_(weights, columns[cols].to(dtype))
            grad_columns[cols] = weights.T @ rows.to(dtype)
            grad_scale += (weights * dots).sum()
        return ((grad_rows * s).to(rows.dtype), (grad_columns * s).to(columns.dtype),
                grad_scale.reshape(scale.shape).to(scale.dtype), None, None, None, None)


def streamed_logsumexp(rows: Tensor, columns: Tensor, scale: Tensor, chunk: int, row_group: Tensor | None = None,
                       column_group: Tensor | None = None, own_column: Tensor | None = None) -> Tensor:
    """``logsumexp(scale * rows @ columns.T, dim=1)`` in column chunks, differentiable in all three inputs.

    Args:
        rows: (n, E); columns: (N, E); scale: scalar tensor (the exp'd logit scale).
        chunk: columns per chunk (>= 1); peak extra memory ~ a few (n, chunk) float32 matrices.
        row_group, column_group, own_column: (n,), (N,), (n,) int64, all or none: mask a row's same-group
            columns other than ``own_column`` out of its logsumexp.

    Returns:
        (n,) float32 (float64 for float64 inputs).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if (row_group is None) != (column_group is None) or (row_group is None) != (own_column is None):
        raise ValueError("row_group, column_group and own_column go together")
    return _StreamedLogSumExp.apply(rows, columns, scale, chunk, row_group, column_group, own_column)
