"""Shared image prefix for VLM generation: each image is encoded once and its prompt prefix computed once; every
(box x prompt) job of that image continues from the prefix's key/value cache.

A box-in-prompt region captioner asks up to 50 boxes x 5 prompts of one image. Run job by job, each ``generate``
re-runs the vision tower and re-fills ~600 prefix tokens (LLaVA-1.5: 576 image tokens + the chat template) to
write ~20 new ones. Here, per image, the token rows of its jobs share their longest common prefix (the template,
the image tokens and any fixed prompt text); one forward over the prefixes of the images in play (vision tower
included, images batched) fills a ``DynamicCache``, kept once per image; each batch of jobs then calls
``generate`` with a ``SharedPrefixCache`` that points every row at its image's prefix, and only the suffix tokens as
new input. Under ``cascade_attention`` (``annotators/cascade_attention.py``) each row's queries attend to its image's
prefix (read once for all rows of that image, no per-row copy) and to its own tokens, merged by log-sum-exp; the
per-step cache growth is the rows' own few tokens, not ``rows x ~600``. With greedy decoding the captions are the
per-job path's (same tokens, same positions; float rounding aside).

Row layout of a continuation batch (``join_rows``), ``P`` the longest prefix and ``S`` the longest suffix in it::

    [pad .. pad | prefix_i | pad .. pad | suffix_i]      attention mask 0 on the pads
     `------- P tokens ---' `----- S tokens -----'      the cache stands for the first P tokens

Positions come from the attention mask (``mask.cumsum(-1) - 1``), as ``generate`` computes them for left padding,
so a row's tokens sit at the positions they have without padding: the padding is invisible to the model.

Engines do the same with paged memory (vLLM's automatic prefix caching, SGLang's radix cache); this is the
Hugging Face path for models whose positions are plain 1-D token positions (``SHARED_PREFIX_MODEL_TYPES``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Model types whose prefix cache can be reused as is: 1-D rotary/learned positions, one image-token run per image.
# (Qwen2-VL's M-RoPE positions depend on the image grid; those models keep the per-job path.)
SHARED_PREFIX_MODEL_TYPES = frozenset({"llava"})


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of ``rows``, short enough that every row keeps >= 1 token after it
    (``generate`` needs a new input token to start from)."""
    if not rows:
        return 0
    limit = min(len(r) for r in rows) - 1
    if limit <= 0:
        return 0
    heads = np.array([r[:limit] for r in rows])  # (rows, limit)
    differs = (heads != heads[0]).any(axis=0)
    return int(differs.argmax()) if differs.any() else limit


def join_rows(prefixes: Sequence[Sequence[int]], suffixes: Sequence[Sequence[int]],
              pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows and attention masks, int64 arrays (B, P + S), laid out as the module docstring shows: prefixes
    left-padded to the longest prefix, then suffixes left-padded to the longest suffix. (Filled by slices: a
    ~600-token prefix held as an array is copied, not re-read int by int.)"""
    n_prefix = max(len(p) for p in prefixes)
    n_suffix = max(len(s) for s in suffixes)
    ids = np.full((len(prefixes), n_prefix + n_suffix), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for r, (prefix, suffix) in enumerate(zip(prefixes, suffixes, strict=True)):
        ids[r, n_prefix - len(prefix) : n_prefix] = prefix
        ids[r, ids.shape[1] - len(suffix) :] = suffix
        mask[r, n_prefix - len(prefix) : n_prefix] = 1
        mask[r, ids.shape[1] - len(suffix) :] = 1
    return ids, mask


def mask_positions(mask: Any) -> Any:
    """Position ids (B, L) of a left/mid-padded attention mask (B, L): running count of real tokens - 1, 0 on pads
    (``generate``'s own rule)."""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 0)


@dataclass
class PrefixJobs:
    """The jobs of one call, tokenised: ``rows[j]`` the full prompt tokens of job j, ``image_of[j]`` its image;
    ``prefix_len[i]`` the shared prefix length of image i (set by ``split``)."""

    rows: list[list[int]]
    image_of: list[int]
    prefix_len: dict[int, int] = field(default_factory=dict)
    prefixes: dict[int, np.ndarray] = field(default_factory=dict)

    def split(self) -> None:
        """Set each image's prefix: the longest common prefix of its jobs' rows (``prefix_len``, and the tokens as
        an int64 array in ``prefixes``)."""
        by_image: dict[int, list[list[int]]] = {}
        for row, i in zip(self.rows, self.image_of, strict=True):
            by_image.setdefault(i, []).append(row)
        self.prefix_len = {i: common_prefix_length(rows) for i, rows in by_image.items()}
        self.prefixes = {i: np.array(rows[0][: self.prefix_len[i]], dtype=np.int64) for i, rows in by_image.items()}

    def prefix(self, job: int) -> np.ndarray:
        return self.prefixes[self.image_of[job]]

    def suffix(self, job: int) -> list[int]:
        return self.rows[job][self.prefix_len[self.image_of[job]] :]


# prefill(image indices, ids (n, P), mask (n, P), positions (n, P)) -> per image: [(keys, values) per layer], each
# (1, heads, P, head_dim) as the forward filled them (left padding included).
Prefill = Callable[[list[int], Any, Any, Any], list[list[tuple[Any, Any]]]]


def generate_shared(
    jobs: PrefixJobs,
    *,
    prefill: Prefill,
    model: Any,
    gen_kwargs: dict[str, Any],
    pad_id: int,
    batch_size: int,
    device: Any,
) -> list[Any]:
    """Generate every job of ``jobs`` from its image's shared prefix, ``batch_size`` jobs per ``generate``.

    Jobs are taken in order; a batch may span images. The prefixes of the images a batch needs are computed by
    one ``prefill`` call over those images and kept, once per image, until their last job is done. ``model.generate``
    runs on the joined rows (``join_rows``) with a ``SharedPrefixCache`` that points each row (repeated
    ``max(num_beams, num_return_sequences)`` times, as ``generate`` expands its inputs) at its image's prefix, under
    ``cascade_attention`` (``annotators/cascade_attention.py``): no row holds a copy of its prefix.

    Returns:
        per job, the generated token ids (``num_return_sequences``, n_new) after the prompt, in job order.
    """
    import torch

    from annotators.cascade_attention import SharedPrefixCache, cascade_attention

    jobs.split()
    n_return = int(gen_kwargs.get("num_return_sequences", 1))
    expand = max(int(gen_kwargs.get("num_beams", 1)), n_return)
    last_job = {i: j for j, i in enumerate(jobs.image_of)}
    cached: dict[int, list[tuple[Any, Any]]] = {}  # image -> [(keys, values)] per layer, unpadded (1, H, P_i, D)
    out: list[Any] = []
    for start in range(0, len(jobs.rows), batch_size):
        batch = list(range(start, min(start + batch_size, len(jobs.rows))))
        new = sorted({jobs.image_of[j] for j in batch} - set(cached))
        if new:
            ids, mask = join_rows([jobs.prefixes[i] for i in new], [[] for _ in new], pad_id)
            ids_t, mask_t = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
            with torch.inference_mode():
                layers = prefill(new, ids_t, mask_t, mask_positions(mask_t))
            for i, kv in zip(new, layers, strict=True):  # drop the left padding of this prefill
                n = jobs.prefix_len[i]
                cached[i] = [(k[:, :, k.shape[2] - n :], v[:, :, v.shape[2] - n :]) for k, v in kv]
        ids, mask = join_rows([jobs.prefix(j) for j in batch], [jobs.suffix(j) for j in batch], pad_id)
        images = list(dict.fromkeys(jobs.image_of[j] for j in batch))  # the batch's images, in order: its groups
        group = {i: g for g, i in enumerate(images)}
        row_group = [group[jobs.image_of[j]] for j in batch for _ in range(expand)]
        cache = SharedPrefixCache([cached[i] for i in images], row_group, max(jobs.prefix_len[i] for i in images))
        ids_t, mask_t = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
        with torch.inference_mode(), cascade_attention(model, cache):
            output = model.generate(input_ids=ids_t, attention_mask=mask_t, cache=cache, **gen_kwargs)
        new_tokens = output[:, ids_t.shape[1] :]
        out += [new_tokens[k * n_return : (k + 1) * n_return] for k in range(len(batch))]
        for i in images:
            if last_job[i] <= batch[-1]:
                del cached[i]
    return out


def prefix_rows(cache: Any) -> list[list[tuple[Any, Any]]]:
    """A prefill's filled ``DynamicCache`` (B rows) -> per row ``[(keys, values)]`` per layer, each (1, H, L, D)
    (what a ``Prefill`` returns)."""
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    return [[(k[r : r + 1], v[r : r + 1]) for k, v in layers] for r in range(layers[0][0].shape[0])]
