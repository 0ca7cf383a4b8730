"""UMG-CLIP losses (paper §4.1, Eq. 3), as named terms summed by the trainer.

    L = InfoNCE(image, image caption) + InfoNCE(region, region caption)
        + λ_img · smoothL1(image ↔ image tags) + λ_reg · smoothL1(region ↔ region tags),   λ = 1.

Contrastive terms are CLIP's symmetric cross-entropy over the *global* batch, computed as open_clip's
``local_loss``: each rank builds only its own rows of the logit matrix against the columns of all ranks,
(n_r × N) instead of (N × N), in both directions. Row i of rank r is global row ``offset_r + i``, with
``offset_r`` the prefix sum of the other ranks' row counts (regions per rank differ). Columns are gathered
with gradient (``model.gather``), so the terms of other ranks still reach this rank's embeddings.

Identical texts. Two images (regions) whose captions are the same text meet in each other's softmax when
the caller passes caption ids (:func:`text_ids`: equal ids = identical token sequences, compared across all
ranks) and ``duplicates`` says how:

- ``mask`` (our default): a same-text pair other than the row's own is removed from both softmaxes, so
  neither image competes for the other's caption and a caption counts once among an image's candidates.
- ``multi_positive`` (UniCL / SupCon): the target of a row is spread uniformly over every column with the
  same text, ``loss_i = logsumexp_j(l_ij) - mean_{j: id_j = id_i} l_ij``. Because identical token sequences
  get identical embeddings from a deterministic text tower, this is *the same function* as CLIP's labels
  (value and gradient; ``tests/model/test_losses.py``): CLIP's "pushing away" of a same-text pair cancels
  across the duplicated rows, and what remains is the log k floor both share. It differs only when ids group
  texts whose embeddings differ.
- ``negatives``: CLIP's ``arange`` labels (also what any mode does when no ids are passed or no id repeats).

Tag terms. For every image (region) and every tag of the tag vocabulary (:func:`build_tag_targets`) we
take the cosine similarity of the two embeddings and regress it with smooth-L1 onto 1 if the image
(region) has the tag, else 0; the loss is the mean over all (sample, tag) entries of the global batch. A
regression rather than a softmax over the batch, because samples share or overlap tags (paper: smooth-L1
"considering that different data may share the same or overlapping tags"). With ``shared_tag_vocab`` the
ranks hold one global vocabulary and each rank encodes only a contiguous slice of it; the slices are
gathered (with gradient) so the text tower runs once per tag per step, not once per tag per rank.

Distributed semantics: every rank returns the loss *value* of the global batch, while its backward only
carries its own rows' terms. The gathers' backward sums the other ranks' contributions into each rank's
embeddings, so a rank's embedding gradients are those of one process holding the whole batch; DDP /
DeepSpeed then *average* parameter gradients over the W ranks, so embeddings and ``logit_scale`` get their
gradient multiplied by W (``ScaleGrad``) and the averaged gradients equal the single-process ones
(``tests/model/test_losses.py``, ``tests/model/test_distributed_train.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model.gather import ScaleGrad, gather_packed, world
from model.streamed_logsumexp import streamed_logsumexp

LOSS_KEYS = ("image_caption_loss", "region_caption_loss", "image_tag_loss", "region_tag_loss")
# Two 31-bit polynomial hashes: every product and sum stays far below 2**63 (no integer overflow).
_HASH_PRIMES = (2_147_483_647, 2_147_483_629)


def build_tag_targets(tags_per_sample: Sequence[Sequence[str]]) -> tuple[list[str], torch.Tensor]:
    """Batch tag vocabulary and 0/1 targets.

    Args:
        tags_per_sample: the tag names of each image (or region), N lists.

    Returns:
        (vocab, targets): the sorted union of the tags (T names) and an (N, T) float tensor with 1
        where sample i has tag j.
    """
    vocab = sorted({t for tags in tags_per_sample for t in tags})
    index = {t: j for j, t in enumerate(vocab)}
    targets = torch.zeros(len(tags_per_sample), len(vocab))
    for i, tags in enumerate(tags_per_sample):
        targets[i, [index[t] for t in tags]] = 1.0
    return vocab, targets


def text_ids(tokens: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A 62-bit id per token sequence: equal rows give equal ids; different rows collide with p ~ 2**-62.

    Args:
        tokens: (n, L) integer token ids (what the text tower reads).

    Returns:
        (n,) int64, the same on every rank and device for the same rows (fixed random weights).
    """
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
    for p in _HASH_PRIMES:
        weights = torch.randint(1, p, (tokens.shape[1],), generator=g, dtype=torch.long).to(tokens.device)
        out = out * p + ((tokens.long() % p) * weights).sum(dim=1) % p
    return out


DUPLICATE_MODES = ("negatives", "multi_positive", "mask")


def contrastive_sum(a: torch.Tensor, b: torch.Tensor, all_a: torch.Tensor, all_b: torch.Tensor, offset: int,
                    logit_scale: torch.Tensor, ids: torch.Tensor | None = None, duplicates: str = "mask",
                    chunk: int | None = None) -> torch.Tensor:
    """This rank's rows of the symmetric InfoNCE, summed (divide by 2N for the global mean).

    Args:
        a, b: (n, E) this rank's L2-normalised embeddings; row i of ``a`` pairs with row i of ``b``.
        all_a, all_b: (N, E) every rank's rows, rank-major; rows ``offset … offset + n`` are ``a`` / ``b``.
        offset: global index of this rank's first row.
        logit_scale: scalar temperature (already exp'd).
        ids: (N,) text ids of the pairs (equal = identical text); None = every pair distinct.
        duplicates: what pairs with identical text are to each other (module doc): ``negatives`` (CLIP),
            ``multi_positive`` or ``mask``.
        chunk: when N > chunk, each direction's logsumexp streams over column chunks of this size
            (``model.streamed_logsumexp``: O(n x chunk) memory instead of several (n, N) matrices; same value
            and gradients); None = the (n, N) logits whole.

    Returns:
        scalar: sum over the n local rows of CE(a→b) + CE(b→a).
    """
    if duplicates not in DUPLICATE_MODES:
        raise ValueError(f"duplicates must be one of {DUPLICATE_MODES}, got {duplicates!r}")
    if all_a.shape[0] == 0:
        return (a.sum() + b.sum() + logit_scale) * 0.0  # keeps a grad path through the inputs
    n = a.shape[0]
    labels = torch.arange(offset, offset + n, device=a.device)
    group = counts = None
    if ids is not None and duplicates != "negatives":
        _, group, counts = torch.unique(ids, return_inverse=True, return_counts=True)
        if counts.shape[0] == ids.shape[0]:  # no text repeats: CLIP's labels
            group = counts = None
    mode = duplicates if group is not None else "negatives"
    if chunk is not None and all_a.shape[0] > chunk:
        return _streamed_sum(a, b, all_a, all_b, labels, logit_scale, mode, group, counts, chunk)
    logits_ab = (logit_scale * a) @ all_b.T  # (n, N): no (N, N) matrix on any rank
    logits_ba = (logit_scale * b) @ all_a.T
    if mode == "mask":  # same text, other pair: out of both softmaxes
        same = group[labels].unsqueeze(1) == group.unsqueeze(0)  # (n, N) bool
        same[torch.arange(n, device=a.device), labels] = False
        logits_ab, logits_ba = logits_ab.masked_fill_(same, -torch.inf), logits_ba.masked_fill_(same, -torch.inf)
    elif mode == "multi_positive":
        return sum((torch.logsumexp(_at_least_fp32(logits), dim=1)
                    - _mean_positive(rows, columns, logit_scale, group[labels], group, counts)).sum()
                   for rows, columns, logits in ((a, all_b, logits_ab), (b, all_a, logits_ba)))
    return (F.cross_entropy(logits_ab, labels, reduction="sum")
            + F.cross_entropy(logits_ba, labels, reduction="sum"))


def _mean_positive(rows, columns, logit_scale, local_group, group, counts) -> torch.Tensor:
    """(n,) float32 ``mean_{j: same text as i} l_ij`` through per-text mean embeddings (G, E): no (n, N) target
    matrix."""
    mean = columns.new_zeros(counts.shape[0], columns.shape[1]).index_add(0, group, columns)
    mean = mean / counts.unsqueeze(1).to(columns.dtype)
    return _at_least_fp32((logit_scale * rows * mean[local_group]).sum(dim=1))


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _streamed_sum(a, b, all_a, all_b, labels, logit_scale, mode, group, counts, chunk) -> torch.Tensor:
    """:func:`contrastive_sum` with each direction's logsumexp streamed over column chunks: Σ_i lse_i - positive_i,
    the positive being the own column's logit (``mask``, ``negatives``) or the group mean (``multi_positive``)."""
    masks = (group[labels], group, labels) if mode == "mask" else (None, None, None)
    total = 0.0
    for rows, columns in ((a, all_b), (b, all_a)):
        lse = streamed_logsumexp(rows, columns, logit_scale, chunk, *masks)
        if mode == "multi_positive":
            positive = _mean_positive(rows, columns, logit_scale, group[labels], group, counts)
        else:
            positive = _at_least_fp32((logit_scale * rows * columns[labels]).sum(dim=1))
        total = total + (lse - positive).sum()
    return total


def tag_sum(emb: torch.Tensor, tag_emb: torch.Tensor, targets: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Smooth-L1 between cosine similarities to the tag vocabulary and 0/1 targets, summed over the entries.

    Args:
        emb: (n, E) L2-normalised image or region embeddings.
        tag_emb: (T, E) L2-normalised embeddings of the tag vocabulary.
        targets: (n, T) 1 where the sample has the tag, else 0.
        beta: smooth-L1 transition point (cosines lie in [-1, 1]).
    """
    if targets.shape != (emb.shape[0], tag_emb.shape[0]):
        raise ValueError(f"targets {tuple(targets.shape)} != (samples {emb.shape[0]}, tags {tag_emb.shape[0]})")
    sims = emb @ tag_emb.T
    return F.smooth_l1_loss(sims.float(), targets.to(sims.device, torch.float32), reduction="sum", beta=beta)


def global_means(sums: Sequence[torch.Tensor], counts: Sequence[int], group=None) -> list[torch.Tensor]:
    """Per term: value = (sum over ranks of ``sums``) / (sum over ranks of ``counts``), gradient = local sum / that.

    One all-reduce for all terms. A term with no entries anywhere is 0 (with a grad path).
    """
    local = torch.stack([s.detach().float() for s in sums])
    totals = torch.cat([local, torch.tensor([float(c) for c in counts], device=local.device)])
    if world(group)[0] > 1:
        torch.distributed.all_reduce(totals, group=group)
    k = len(sums)
    return [(s.float() + (totals[i] - local[i])) / totals[k + i].clamp_min(1.0) for i, s in enumerate(sums)]


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, group=None,
                     ids: torch.Tensor | None = None, duplicates: str = "mask", chunk: int | None = None
                     ) -> torch.Tensor:
    """Symmetric InfoNCE of one pair of embedding sets over the global batch (see :func:`contrastive_sum`).

    Args:
        a, b: (n, E) local L2-normalised embeddings; ids: (n,) local text ids or None; duplicates, chunk: see
            :func:`contrastive_sum`.

    Returns:
        scalar: (CE(a→b) + CE(b→a)) / 2 averaged over the N global rows; 0 (with a grad path) if N = 0.
        Gradients are this rank's share (see the module doc for the factor W under DDP).
    """
    gathered_a, gathered_b = gather_packed([a, b], group)
    all_ids = None if ids is None else gather_packed([ids], group, with_grad=False)[0].rows
    total = contrastive_sum(a, b, gathered_a.rows, gathered_b.rows, gathered_a.offset, logit_scale, all_ids,
                            duplicates, chunk)
    return global_means([total], [2 * a.shape[0]], group)[0]


def tag_loss(emb: torch.Tensor, tag_emb: torch.Tensor, targets: torch.Tensor, beta: float = 1.0,
             group=None) -> torch.Tensor:
    """Mean smooth-L1 tag loss over the (sample, tag) entries of all ranks (see :func:`tag_sum`)."""
    return global_means([tag_sum(emb, tag_emb, targets, beta)], [targets.numel()], group)[0]


class UMGLoss(nn.Module):
    """The four UMG-CLIP loss terms.

    Args:
        lambda_image_tag: λ_img (paper: 1.0).
        lambda_region_tag: λ_reg (paper: 1.0).
        smooth_l1_beta: smooth-L1 β of the tag losses (paper: not given; torch default 1.0).
        duplicate_captions: how pairs with identical captions treat each other when ids are passed
            (``mask``, ``multi_positive``, ``negatives``; see the module doc).
        shared_tag_vocab: the tag embeddings a rank passes are its contiguous slice (rank order) of one
            vocabulary shared by all ranks, and the targets index the whole vocabulary; False: each rank's
            tag embeddings are its own whole vocabulary.
        group: process group to gather over (default: the world, when initialised).
        lambda_image_caption, lambda_region_caption: weights of the two InfoNCE terms (paper: 1; 0 for the
            paper's "tag loss only" ablation, Tab. 7 text).
        contrastive_chunk: a contrastive term with more global columns than this streams its logsumexp over
            column chunks of this size (:func:`contrastive_sum`; the region term at paper scale); None = never.
    """

    def __init__(self, lambda_image_tag: float = 1.0, lambda_region_tag: float = 1.0,
                 smooth_l1_beta: float = 1.0, duplicate_captions: str = "mask", shared_tag_vocab: bool = False,
                 group=None, *, lambda_image_caption: float = 1.0, lambda_region_caption: float = 1.0,
                 contrastive_chunk: int | None = None):
        super().__init__()
        if contrastive_chunk is not None and contrastive_chunk < 1:
            raise ValueError(f"contrastive_chunk must be >= 1 or None, got {contrastive_chunk}")
        self.contrastive_chunk = contrastive_chunk
        self.lambda_image_caption = lambda_image_caption
        self.lambda_region_caption = lambda_region_caption
        if duplicate_captions not in DUPLICATE_MODES:
            raise ValueError(f"duplicate_captions must be one of {DUPLICATE_MODES}, got {duplicate_captions!r}")
        self.duplicate_captions = duplicate_captions
        self.lambda_image_tag = lambda_image_tag
        self.lambda_region_tag = lambda_region_tag
        self.smooth_l1_beta = smooth_l1_beta
        self.shared_tag_vocab = shared_tag_vocab
        self.group = group

    def forward(
        self,
        image_emb: torch.Tensor,
        caption_emb: torch.Tensor,
        region_emb: torch.Tensor | None = None,
        region_caption_emb: torch.Tensor | None = None,
        image_tag_emb: torch.Tensor | None = None,
        image_tag_targets: torch.Tensor | None = None,
        region_tag_emb: torch.Tensor | None = None,
        region_tag_targets: torch.Tensor | None = None,
        logit_scale: torch.Tensor | None = None,
        caption_ids: torch.Tensor | None = None,
        region_caption_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Compute the named losses (weights already applied); sum the values for the total.

        Args:
            image_emb, caption_emb: (B, E) local image / paired image-caption embeddings.
            region_emb, region_caption_emb: (M, E) local region / paired region-caption embeddings
                (M may be 0 or differ between ranks; None = no regions).
            image_tag_emb: (T, E) tag vocabulary embeddings (this rank's slice with ``shared_tag_vocab``);
                image_tag_targets: (B, T_all) 0/1 over the whole vocabulary.
            region_tag_emb: (T_r, E); region_tag_targets: (M, T_r_all) 0/1.
            logit_scale: scalar temperature, already exp'd (``UMGCLIP.logit_scale_exp()``).
            caption_ids, region_caption_ids: (B,) / (M,) text ids (:func:`text_ids`) of the captions, for
                ``duplicate_captions``; None = every caption distinct (CLIP's labels).

        Returns:
            ``{"image_caption_loss", "region_caption_loss", "image_tag_loss", "region_tag_loss"}``,
            each a scalar; a term without inputs is 0 with a grad path.
        """
        if logit_scale is None:
            raise ValueError("logit_scale is required")
        if region_emb is None:
            region_emb = region_caption_emb = image_emb.new_zeros(0, image_emb.shape[1])
            region_caption_ids = None if region_caption_ids is None else region_caption_ids[:0]
        if region_caption_emb is None:
            raise ValueError("region_emb needs region_caption_emb")
        image_tag_emb, image_tag_targets = _tag_inputs(image_emb, image_tag_emb, image_tag_targets)
        region_tag_emb, region_tag_targets = _tag_inputs(region_emb, region_tag_emb, region_tag_targets)
        size, _ = world(self.group)
        embs = [image_emb, caption_emb, region_emb, region_caption_emb, image_tag_emb, region_tag_emb]
        if size > 1:  # undo DDP's average over ranks (module doc)
            embs = [ScaleGrad.apply(t, float(size)) for t in embs]
            logit_scale = ScaleGrad.apply(logit_scale, float(size))
        image_emb, caption_emb, region_emb, region_caption_emb, image_tag_emb, region_tag_emb = embs
        dtype = torch.promote_types(image_emb.dtype, caption_emb.dtype)
        gathered = gather_packed([t.to(dtype) for t in embs[: 6 if self.shared_tag_vocab else 4]], self.group)
        ids = self._gather_ids(caption_ids, region_caption_ids)
        if self.shared_tag_vocab:
            image_tag_emb, region_tag_emb = gathered[4].rows, gathered[5].rows
        sums = [
            contrastive_sum(image_emb, caption_emb, gathered[0].rows, gathered[1].rows, gathered[0].offset,
                            logit_scale, ids[0], self.duplicate_captions, self.contrastive_chunk),
            contrastive_sum(region_emb, region_caption_emb, gathered[2].rows, gathered[3].rows, gathered[2].offset,
                            logit_scale, ids[1], self.duplicate_captions, self.contrastive_chunk),
            tag_sum(image_emb, image_tag_emb, image_tag_targets, self.smooth_l1_beta),
            tag_sum(region_emb, region_tag_emb, region_tag_targets, self.smooth_l1_beta),
        ]
        counts = [2 * image_emb.shape[0], 2 * region_emb.shape[0], image_tag_targets.numel(),
                  region_tag_targets.numel()]
        values = global_means(sums, counts, self.group)
        weights = (self.lambda_image_caption, self.lambda_region_caption, self.lambda_image_tag,
                   self.lambda_region_tag)
        values = [w * v for w, v in zip(weights, values)]
        return dict(zip(LOSS_KEYS, values))

    def _gather_ids(self, caption_ids: torch.Tensor | None, region_caption_ids: torch.Tensor | None
                    ) -> list[torch.Tensor | None]:
        """Both id vectors over all ranks in one collective; None stays None (the same on every rank)."""
        present = [i for i in (caption_ids, region_caption_ids) if i is not None]
        gathered = iter(gather_packed([i.long() for i in present], self.group, with_grad=False) if present else [])
        return [None if i is None else next(gathered).rows for i in (caption_ids, region_caption_ids)]


def _tag_inputs(emb: torch.Tensor, tag_emb: torch.Tensor | None, targets: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty vocabulary and targets for a term without tags; targets on the embeddings' device."""
    if tag_emb is None or targets is None:
        return emb.new_zeros(0, emb.shape[1]), emb.new_zeros(emb.shape[0], 0)
    return tag_emb, targets.to(emb.device)


def total_loss(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum every ``*_loss`` entry (open_clip's convention)."""
    return sum(v for k, v in losses.items() if k.endswith("_loss"))
