"""UMG-CLIP losses (paper §4.1, Eq. 3), as named terms summed by the trainer.

    L = InfoNCE(image, image caption) + InfoNCE(region, region caption)
        + λ_img · smoothL1(image ↔ image tags) + λ_reg · smoothL1(region ↔ region tags),   λ = 1.

Contrastive terms are CLIP's symmetric cross-entropy over the *global* batch: embeddings are
gathered from all ranks (sizes first, so ranks may hold different numbers of regions), and the local
slice of the gathered matrix is the rank's own grad-carrying tensor (open_clip ``gather_features``
with ``local_loss=False, gather_with_grad=False``).

Tag terms. For every image (region) and every tag of the batch-level tag vocabulary (the union of
the tags in the rank's batch, see :func:`build_tag_targets`) we take the cosine similarity of the
two embeddings and regress it with smooth-L1 onto 1 if the image (region) has the tag, else 0; the
loss is the mean over all (sample, tag) entries. A regression rather than a softmax over the batch,
because samples share or overlap tags: two images tagged "dog" are not each other's negatives, and an
image has several correct tags at once (paper: smooth-L1 "considering that different data may share
the same or overlapping tags"). The vocabulary is per rank; only the normalising count and the
reported value are reduced across ranks.

Distributed semantics: every rank returns the loss of the global batch. Each rank's backward only
reaches its own embeddings, and DDP/DeepSpeed then *average* gradients over the W ranks, which would
leave the towers with 1/W of the single-process gradient (open_clip's ``ClipLoss`` has this factor).
So the embeddings' gradients are multiplied by W in backward; the averaged gradients then equal those
of one process holding the whole batch. ``logit_scale`` is used whole on every rank, so its gradient
is left as is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

LOSS_KEYS = ("image_caption_loss", "region_caption_loss", "image_tag_loss", "region_tag_loss")


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


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def _world(group) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), dist.get_rank(group)
    return 1, 0


def gather_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather (n_r, E) row blocks of possibly different n_r, rank-major.

    The local block of the result is ``x`` itself (carries gradient); the others are detached.
    Returns (sum n_r, E). Without an initialised process group returns ``x``.
    """
    world, rank = _world(group)
    if world == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    blocks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(blocks, padded, group=group)
    parts = [b[:s] for b, s in zip(blocks, sizes)]
    parts[rank] = x
    return torch.cat(parts, dim=0)


def _zero(*tensors: torch.Tensor | None) -> torch.Tensor:
    """A zero that depends on the inputs, so backward still runs through them (no NaN, no unused params)."""
    live = [t.sum() for t in tensors if t is not None]
    return sum(live) * 0.0 if live else torch.zeros(())


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, group=None) -> torch.Tensor:
    """Symmetric InfoNCE between row-paired embeddings, gathered over ranks.

    Args:
        a, b: (n, E) local L2-normalised embeddings; row i of ``a`` pairs with row i of ``b``.
        logit_scale: scalar temperature (already exp'd).

    Returns:
        scalar: (CE(a→b) + CE(b→a)) / 2 over the global batch; 0 (with a grad path) if it is empty.
    """
    both = gather_rows(torch.cat([a, b], dim=1), group)
    all_a, all_b = both.split([a.shape[1], b.shape[1]], dim=1)
    if all_a.shape[0] == 0:
        return _zero(a, b, logit_scale)
    logits = logit_scale * all_a @ all_b.T
    labels = torch.arange(all_a.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def tag_loss(emb: torch.Tensor, tag_emb: torch.Tensor, targets: torch.Tensor, beta: float = 1.0,
             group=None) -> torch.Tensor:
    """Smooth-L1 between cosine similarities to the tag vocabulary and 0/1 tag targets.

    Args:
        emb: (n, E) L2-normalised image or region embeddings.
        tag_emb: (T, E) L2-normalised embeddings of the batch tag vocabulary.
        targets: (n, T) 1 where the sample has the tag, else 0.
        beta: smooth-L1 transition point (cosines lie in [-1, 1]).

    Returns:
        scalar mean over the (sample, tag) entries of all ranks; 0 (with a grad path) if none.
    """
    if targets.shape != (emb.shape[0], tag_emb.shape[0]):
        raise ValueError(f"targets {tuple(targets.shape)} != (samples {emb.shape[0]}, tags {tag_emb.shape[0]})")
    sims = emb @ tag_emb.T
    local_sum = F.smooth_l1_loss(sims, targets.to(sims.dtype), reduction="sum", beta=beta)
    totals = torch.stack([local_sum.detach().float(), torch.tensor(float(targets.numel()), device=sims.device)])
    if _world(group)[0] > 1:
        dist.all_reduce(totals, group=group)
    if totals[1] == 0:
        return _zero(emb, tag_emb)
    # Value: the global mean; gradient: through the local entries only.
    return (local_sum + (totals[0] - local_sum.detach())) / totals[1]


class UMGLoss(nn.Module):
    """The four UMG-CLIP loss terms.

    Args:
        lambda_image_tag: λ_img (paper: 1.0).
        lambda_region_tag: λ_reg (paper: 1.0).
        smooth_l1_beta: smooth-L1 β of the tag losses (paper: not given; torch default 1.0).
        group: process group to gather over (default: the world, when initialised).
        lambda_image_caption, lambda_region_caption: weights of the two InfoNCE terms (paper: 1; 0 for the
            paper's "tag loss only" ablation, Tab. 7 text).
    """

    def __init__(self, lambda_image_tag: float = 1.0, lambda_region_tag: float = 1.0,
                 smooth_l1_beta: float = 1.0, group=None, *, lambda_image_caption: float = 1.0,
                 lambda_region_caption: float = 1.0):
        super().__init__()
        self.lambda_image_caption = lambda_image_caption
        self.lambda_region_caption = lambda_region_caption
        self.lambda_image_tag = lambda_image_tag
        self.lambda_region_tag = lambda_region_tag
        self.smooth_l1_beta = smooth_l1_beta
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
    ) -> dict[str, torch.Tensor]:
        """Compute the named losses (weights already applied); sum the values for the total.

        Args:
            image_emb, caption_emb: (B, E) local image / paired image-caption embeddings.
            region_emb, region_caption_emb: (M, E) local region / paired region-caption embeddings
                (M may be 0 or differ between ranks; None = no regions).
            image_tag_emb: (T, E) tag vocabulary embeddings; image_tag_targets: (B, T) 0/1.
            region_tag_emb: (T_r, E); region_tag_targets: (M, T_r) 0/1.
            logit_scale: scalar temperature, already exp'd (``UMGCLIP.logit_scale_exp()``).

        Returns:
            ``{"image_caption_loss", "region_caption_loss", "image_tag_loss", "region_tag_loss"}``,
            each a scalar; a term without inputs is 0 with a grad path.
        """
        if logit_scale is None:
            raise ValueError("logit_scale is required")
        world, _ = _world(self.group)
        if world > 1:
            region_emb, region_caption_emb, image_tag_emb, region_tag_emb, image_emb, caption_emb = (
                None if t is None else _ScaleGrad.apply(t, float(world))
                for t in (region_emb, region_caption_emb, image_tag_emb, region_tag_emb, image_emb, caption_emb))
        if region_emb is None:
            region_emb = region_caption_emb = image_emb.new_zeros(0, image_emb.shape[1])
        if region_caption_emb is None:
            raise ValueError("region_emb needs region_caption_emb")
        out = {
            "image_caption_loss": self.lambda_image_caption * contrastive_loss(
                image_emb, caption_emb, logit_scale, self.group),
            "region_caption_loss": self.lambda_region_caption * contrastive_loss(
                region_emb, region_caption_emb, logit_scale, self.group),
        }
        out["image_tag_loss"] = self._tag_term(self.lambda_image_tag, image_emb, image_tag_emb, image_tag_targets)
        out["region_tag_loss"] = self._tag_term(self.lambda_region_tag, region_emb, region_tag_emb,
                                                region_tag_targets)
        return out

    def _tag_term(self, weight: float, emb: torch.Tensor, tag_emb: torch.Tensor | None,
                  targets: torch.Tensor | None) -> torch.Tensor:
        if tag_emb is None or targets is None:
            tag_emb = emb.new_zeros(0, emb.shape[1])
            targets = emb.new_zeros(emb.shape[0], 0)
        return weight * tag_loss(emb, tag_emb, targets.to(emb.device), self.smooth_l1_beta, self.group)


def total_loss(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum every ``*_loss`` entry (open_clip's convention)."""
    return sum(v for k, v in losses.items() if k.endswith("_loss"))
