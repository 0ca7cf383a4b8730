"""Cascade attention over a shared prefix: the prefix keys/values of an image are kept once, not copied per row.

``annotators/shared_prefix.py`` continues many (box x prompt) rows from the prefix of their image (~600 tokens for
LLaVA-1.5). Held in a ``DynamicCache``, every row carries its own copy of that prefix and every decode step
concatenates and re-reads the whole ``(rows, heads, prefix + t, head_dim)`` tensor. Here a ``SharedPrefixCache``
holds, per decoder layer, each image's prefix keys/values once ``(1, H_kv, P_g, D)`` and only the rows' own tokens
after it ``(rows, H_kv, L, D)``; the attention function registered under ``ATTENTION`` (transformers'
``AttentionInterface``) attends each row's queries

- to its image's prefix: the queries of all rows of that image are stacked into one ``(1, H_kv, rows * heads per
  kv head * q, D)`` attention with the prefix, which is read once per image (no mask: every prefix token precedes
  every query);
- to its own tokens: causal, with the padding mask ``generate`` builds for the columns after the prefix;

and merges both parts by their log-sum-exp (the cascade / shared-prefix attention of FlashInfer and Hydragen):
``out = out_p * exp(lse_p - lse) + out_s * exp(lse_s - lse)``, ``lse = logaddexp(lse_p, lse_s)``. That is exactly
softmax attention over the concatenated keys, so greedy tokens are those of the copied-prefix path up to float
rounding. Each part runs PyTorch's fused CPU flash-attention kernel on CPU (it returns the log-sum-exp too) and
plain matrix products + softmax elsewhere (``attend_fused_cpu`` / ``attend_matmul``), both parts and the merge in
float32 (bf16/fp16 queries and own keys upcast per call, the prefixes once per cache), rounded once at the end.
In bf16 that is not the per-job path's rounding, so its greedy captions can differ where bf16 itself flips them.

Use: ``with cascade_attention(model, cache): model.generate(..., cache=cache)``. The block makes ``cache`` the one
the attention function reads (by ``module.layer_idx``) in this context (a ``ContextVar``: threads do not see each
other's); the decoder's ``sdpa`` is replaced by ``ATTENTION`` on first use, which is ``sdpa`` itself outside such a
block. Decoders whose attention modules call ``ALL_ATTENTION_FUNCTIONS`` with ``layer_idx``
and ``num_key_value_groups`` (Llama, OPT, ...) work; beam search reorders the rows (``reorder_cache``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from transformers import AttentionInterface, Cache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "umg_shared_prefix"

_ACTIVE: ContextVar[SharedPrefixCache | None] = ContextVar("umg_shared_prefix_cache", default=None)

KV = tuple[torch.Tensor, torch.Tensor]


class SharedPrefixLayer(DynamicLayer):
    """One decoder layer of a ``SharedPrefixCache``: ``prefixes[g]`` the keys/values ``(1, H_kv, P_g, D)`` of group g's
    prefix, unpadded; ``keys``/``values`` the rows' tokens after the prefix ``(rows, H_kv, L, D)`` (grown by
    ``update``). Lengths and mask sizes count ``n_prefix`` (the longest prefix: the rows' left-padded prefix
    columns) before the rows' own tokens."""

    is_croppable = False

    def __init__(self, prefixes: Sequence[KV], n_prefix: int) -> None:
        super().__init__()
        self.prefixes = list(prefixes)
        self.n_prefix = n_prefix

    def own_length(self) -> int:
        return super().get_seq_length()

    def get_seq_length(self) -> int:
        return self.n_prefix + self.own_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The mask covers the rows' own columns only: ``own + query_length`` columns from offset ``n_prefix``."""
        return self.own_length() + query_length, self.n_prefix

    def select_rows(self, index: torch.Tensor) -> None:
        if self.own_length() > 0:
            self.keys = self.keys.index_select(0, index.to(self.keys.device))
            self.values = self.values.index_select(0, index.to(self.values.device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.own_length() > 0:
            super().batch_repeat_interleave(repeats)


class SharedPrefixCache(Cache):
    """A ``Cache`` whose rows continue from shared prefixes: ``prefixes[g]`` the per-layer ``[(keys, values)]`` of
    group g (each ``(1, H_kv, P_g, D)``), ``row_group[r]`` the group of row r, ``n_prefix`` the longest ``P_g`` (the
    width of the rows' left-padded prefix columns in the attention mask ``generate`` holds)."""

    def __init__(self, prefixes: Sequence[Sequence[KV]], row_group: Sequence[int], n_prefix: int) -> None:
        n_layers = {len(p) for p in prefixes}
        if len(n_layers) != 1:
            raise ValueError(f"every prefix needs the same number of layers, got {sorted(n_layers)}")
        if any(k.shape[2] > n_prefix for p in prefixes for k, _ in p):
            raise ValueError(f"a prefix is longer than n_prefix={n_prefix}")
        # float32 once per cache (a no-op for float32 models): the attention runs in float32
        prefixes = [[(k.float(), v.float()) for k, v in p] for p in prefixes]
        layers = [SharedPrefixLayer([p[i] for p in prefixes], n_prefix) for i in range(n_layers.pop())]
        super().__init__(layers=layers)
        self.row_group = torch.as_tensor(list(row_group), dtype=torch.long)
        self._group_rows()

    def _group_rows(self) -> None:
        """``self.groups``: per group with a non-empty prefix, its rows as a slice (contiguous) or an index tensor."""
        device = self.layers[0].prefixes[0][0].device if self.layers and self.layers[0].prefixes else None
        self.groups: list[tuple[int, slice | torch.Tensor]] = []
        for g in torch.unique(self.row_group).tolist():
            if not self.layers or self.layers[0].prefixes[g][0].shape[2] == 0:
                continue  # nothing to attend to before the row's own tokens
            rows = torch.nonzero(self.row_group == g).flatten()
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            self.groups.append((g, slice(lo, hi) if hi - lo == len(rows) else rows.to(device)))

    def _select(self, index: torch.Tensor) -> None:
        self.row_group = self.row_group[index.cpu()]
        self._group_rows()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.row_group = self.row_group.repeat_interleave(repeats)
        self._group_rows()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SharedPrefixCache cannot be cropped (assisted decoding is not supported)")


def attend_matmul(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                  mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention (B, H, Q, D) x (B, H, K, D) -> (output (B, H, Q, D) float32, log-sum-exp of the scaled
    scores (B, H, Q) float32). ``mask`` (bool, True = attend) broadcasts to (B, H, Q, K); masked scores are the
    dtype's minimum (as transformers' eager attention does), so a query with every key masked stays finite and its
    log-sum-exp is ~-3.4e38: it weighs nothing once merged. The log-sum-exp comes from the softmax itself:
    ``lse = max_j s_j - log(max_j p_j)`` (the largest probability is >= 1/K, so this is well conditioned)."""
    scores = torch.matmul(query * scaling, key.transpose(-1, -2)).float()
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    lse = scores.amax(dim=-1) - torch.log(probs.amax(dim=-1))
    return torch.matmul(probs.to(value.dtype), value).float(), lse


def attend_fused_cpu(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                     mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``attend_matmul`` in one blocked pass: PyTorch's CPU flash-attention kernel, which returns the log-sum-exp
    with the output (``aten._scaled_dot_product_flash_attention_for_cpu``, what ``sdpa`` runs on CPU). The mask is
    made additive with the dtype's minimum, not -inf: the kernel gives a fully masked query log-sum-exp 0 under
    -inf, but ~-3.4e38 (no weight once merged) under the minimum."""
    if mask is not None:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, attn_mask=mask,
                                                                          scale=scaling)
    return out.float(), lse


def _attend(query: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    fused = query.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    return (attend_fused_cpu if fused else attend_matmul)(query, *args, **kwargs)


def _own_mask(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, device: Any) -> torch.Tensor | None:
    """The rows' own-token mask: ``generate``'s (B, 1, q, kv) boolean one, or where it was skipped (no padding) the
    plain causal mask aligned to the last query (none for one query)."""
    if attention_mask is not None:
        return attention_mask.bool()
    if q_len == 1:
        return None
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
    return (q_pos[:, None] >= torch.arange(kv_len, device=device)[None, :]).view(1, 1, q_len, kv_len)


def _heads_first(x: torch.Tensor, n_kv: int) -> torch.Tensor:
    """(n, H, q, D) -> (1, H_kv, n * H/H_kv * q, D): the queries of n rows that read the same key/value head."""
    n, heads, q_len, dim = x.shape
    return x.reshape(n, n_kv, heads // n_kv, q_len, dim).transpose(0, 1).reshape(1, n_kv, -1, dim)


def _rows_first(x: torch.Tensor, n: int, heads: int, q_len: int) -> torch.Tensor:
    """Inverse of ``_heads_first`` for (1, H_kv, N, ...) -> (n, H, q, ...)."""
    n_kv, rest = x.shape[1], x.shape[3:]
    return x.reshape(n_kv, n, heads // n_kv, q_len, *rest).transpose(0, 1).reshape(n, heads, q_len, *rest)


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` function: ``query`` (B, H, q, D) against the active ``SharedPrefixCache``'s prefix of
    each row's group plus the rows' own ``key``/``value`` (B, H_kv, L, D) -> (B, q, H, D); ``sdpa`` when no cache
    is active in this context."""
    cache = _ACTIVE.get()
    if cache is None:  # not continuing from a shared prefix here: plain sdpa
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    layer = cache.layers[module.layer_idx]
    batch, heads, q_len, dim = query.shape
    n_kv = key.shape[1]
    scaling = dim**-0.5 if scaling is None else scaling
    rep = heads // n_kv
    q32 = query.float()  # both parts and their merge in float32, rounded once at the end (as sdpa's kernels do)
    own_k = (key.repeat_interleave(rep, dim=1) if rep > 1 else key).float()
    own_v = (value.repeat_interleave(rep, dim=1) if rep > 1 else value).float()
    out, lse = _attend(q32, own_k, own_v, scaling, _own_mask(attention_mask, q_len, key.shape[2], query.device))
    for g, rows in cache.groups:
        prefix_k, prefix_v = layer.prefixes[g]
        q_rows = q32[rows]
        n = q_rows.shape[0]
        p_out, p_lse = _attend(_heads_first(q_rows, n_kv), prefix_k, prefix_v, scaling)
        p_out, p_lse = _rows_first(p_out, n, heads, q_len), _rows_first(p_lse.unsqueeze(-1), n, heads, q_len)[..., 0]
        s_out, s_lse = out[rows], lse[rows]
        total = torch.logaddexp(p_lse, s_lse)  # finite: so are both parts (masked: ~-3.4e38)
        merged = p_out * torch.exp(p_lse - total).unsqueeze(-1) + s_out * torch.exp(s_lse - total).unsqueeze(-1)
        out[rows] = merged
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``ATTENTION`` with transformers (its attention function, and ``sdpa``'s boolean mask)."""
    AttentionInterface.register(ATTENTION, shared_prefix_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


@contextmanager
def cascade_attention(model: Any, cache: SharedPrefixCache) -> Iterator[None]:
    """Within the block, ``model``'s decoder attends over ``cache`` (in this thread / context only).

    The first call switches the decoder from ``sdpa`` to ``ATTENTION`` for good: outside such a block (no cache
    active in the context) the function is ``sdpa`` itself, so other threads and the per-job path are unaffected.
    A decoder on another implementation (eager, flash attention) is refused with a ``ValueError``."""
    register()
    decoder = model.get_decoder()
    current = decoder.config._attn_implementation
    if current != ATTENTION:
        if current != "sdpa":
            raise ValueError(f"shared-prefix attention replaces 'sdpa', but {type(decoder).__name__} uses {current!r}: "
                             "load it with sdpa or set shared_prefix: false")
        decoder.set_attn_implementation(ATTENTION)
    token = _ACTIVE.set(cache)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


register()  # on import: a decoder already switched (e.g. unpickled in a worker) finds its attention function
