"""FC-CLIP inference as pure tensor functions (github.com/bytedance/fc-clip, ``fcclip/fcclip.py``).

- :func:`mask_pool`: mean of features under each binarised mask (FC-CLIP ``MaskPooling``).
- :func:`geometric_ensemble`: in-vocabulary probabilities ``p_in`` (the trained head) and out-of-vocabulary
  probabilities ``p_out`` (the frozen model's mask-pooled features) combine per class as
  ``p_in^(1-w) · p_out^w``, ``w = alpha`` for classes seen in training and ``beta`` for unseen ones,
  and, only when asked (FC-CLIP's ``ENSEMBLE_ON_VALID_MASK``, off in its configs), ``w = 0`` for queries whose
  mask is empty at the pooling resolution; the result is renormalised and shares ``1 - p(void)`` with the
  head's void probability.
- :func:`semantic_inference`, :func:`panoptic_inference`, :func:`instance_inference`: Mask2Former's
  post-processing (``semantic_inference`` / ``panoptic_inference`` / ``instance_inference`` of FC-CLIP), the
  semantic map normalised over classes (same argmax as FC-CLIP's unnormalised sum).
"""

from __future__ import annotations

import torch


def mask_pool(features: torch.Tensor, mask_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean feature under each mask (``logit > 0``); no gradient through the masks.

    Args:
        features: (B, C, h, w).
        mask_logits: (B, Q, h, w) at the features' resolution.

    Returns:
        pooled (B, Q, C) (zeros for empty masks) and valid (B, Q) bool (mask not empty).
    """
    masks = (mask_logits.detach() > 0).to(features.dtype)
    area = masks.sum(dim=(-1, -2))
    pooled = torch.einsum("bchw,bqhw->bqc", features, masks / (area[..., None, None] + 1e-8))
    return pooled, area > 0


def geometric_ensemble(in_vocab_logits: torch.Tensor, out_vocab_logits: torch.Tensor, seen: torch.Tensor,
                       alpha: float, beta: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """FC-CLIP's geometric ensemble.

    Args:
        in_vocab_logits: (B, Q, C + 1) head logits, the last column void.
        out_vocab_logits: (B, Q, C) frozen-model logits.
        seen: (C,) bool, class in the training vocabulary.
        alpha, beta: frozen-score weights for seen / unseen classes (FC-CLIP: 0.4 / 0.8).
        valid: (B, Q) bool, queries whose mask pooled something, to gate the frozen scores off on empty
            masks (FC-CLIP ``ENSEMBLE_ON_VALID_MASK``); None = no gating (FC-CLIP's configs).

    Returns:
        (B, Q, C + 1) probabilities (rows sum to 1), void last.
    """
    in_probs = in_vocab_logits[..., :-1].softmax(-1)
    out_probs = out_vocab_logits.softmax(-1)
    weight = torch.where(seen.to(in_probs.device), alpha, beta).to(in_probs.dtype)  # (C,)
    weight = weight.expand_as(in_probs)
    if valid is not None:
        weight = weight * valid[..., None].to(in_probs.dtype)
    ensembled = (in_probs.clamp_min(1e-12).log() * (1 - weight) + out_probs.clamp_min(1e-12).log() * weight).softmax(-1)
    void = in_vocab_logits.softmax(-1)[..., -1:]
    return torch.cat([ensembled * (1 - void), void], dim=-1)


def semantic_inference(class_probs: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Per-class pixel scores: sum over queries of p(class) · sigmoid(mask), normalised over classes.

    Args:
        class_probs: (B, Q, C + 1) (void last, dropped).
        mask_logits: (B, Q, H, W).

    Returns:
        (B, C, H, W), summing to 1 over C at every pixel (argmax = FC-CLIP's).
    """
    scores = torch.einsum("bqc,bqhw->bchw", class_probs[..., :-1], mask_logits.sigmoid())
    return scores / scores.sum(dim=1, keepdim=True).clamp_min(1e-12)


def panoptic_inference(class_probs: torch.Tensor, mask_logits: torch.Tensor, thing_mask: torch.Tensor,
                       object_mask_threshold: float, overlap_threshold: float) -> tuple[torch.Tensor, list[dict]]:
    """One image's panoptic segmentation (Mask2Former/FC-CLIP ``panoptic_inference``).

    Args:
        class_probs: (Q, C + 1) probabilities, void last.
        mask_logits: (Q, H, W).
        thing_mask: (C,) bool.
        object_mask_threshold: keep queries whose best non-void probability exceeds this.
        overlap_threshold: drop a query whose argmax area (pixels it wins) is below this fraction of its own
            mask (``sigmoid >= 0.5``), as FC-CLIP / Mask2Former.

    Returns:
        ``(seg (H, W) int64, 0 = void, segments)``, segments ``{"id", "category_id", "isthing", "score"}``;
        stuff classes merge into one segment each.
    """
    num_classes = class_probs.shape[-1] - 1
    scores, labels = class_probs.max(-1)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    scores, labels, masks = scores[keep], labels[keep], mask_logits[keep].sigmoid()
    seg = torch.zeros(mask_logits.shape[-2:], dtype=torch.int64, device=mask_logits.device)
    segments: list[dict] = []
    if masks.shape[0] == 0:
        return seg, segments
    owner = (scores[:, None, None] * masks).argmax(0)
    stuff_ids: dict[int, int] = {}
    for k in range(masks.shape[0]):
        cls = int(labels[k])
        isthing = bool(thing_mask[cls])
        won, own = owner == k, masks[k] >= 0.5
        mask = won & own
        if not own.any() or not mask.any() or won.sum() / own.sum() < overlap_threshold:
            continue
        if not isthing and cls in stuff_ids:
            seg[mask] = stuff_ids[cls]
            continue
        segments.append({"id": len(segments) + 1, "category_id": cls, "isthing": isthing, "score": float(scores[k])})
        seg[mask] = len(segments)
        if not isthing:
            stuff_ids[cls] = len(segments)
    return seg, segments


def instance_inference(class_probs: torch.Tensor, mask_logits: torch.Tensor, thing_mask: torch.Tensor | None,
                       topk: int = 100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's instances (Mask2Former/FC-CLIP ``instance_inference``): the ``topk`` best (query, class)
    pairs over all queries and classes; with ``thing_mask`` (a panoptic vocabulary) only thing classes stay.

    Args:
        class_probs: (Q, C + 1) probabilities, void last (dropped).
        mask_logits: (Q, H, W).
        thing_mask: (C,) bool or None (every class is a thing).
        topk: pairs kept (FC-CLIP: ``TEST.DETECTIONS_PER_IMAGE`` = 100).

    Returns:
        queries (K,) int64 (the mask of instance k is ``mask_logits[queries[k]] > 0``), scores (K,) = class
        probability x mean sigmoid inside that mask, labels (K,) int64 class indices.
    """
    num_queries, num_classes = class_probs.shape[0], class_probs.shape[1] - 1
    flat = class_probs[:, :-1].reshape(-1)
    scores, index = flat.topk(min(topk, flat.numel()), sorted=False)
    labels, queries = index % num_classes, index // num_classes
    if thing_mask is not None:
        keep = thing_mask.to(labels.device)[labels]
        scores, labels, queries = scores[keep], labels[keep], queries[keep]
    logits = mask_logits[queries].flatten(1)
    binary = (logits > 0).to(logits.dtype)
    mask_scores = (logits.sigmoid() * binary).sum(1) / (binary.sum(1) + 1e-6)
    return queries, scores * mask_scores, labels
