"""Metrics of zero-shot classification and image-text retrieval (pure functions on score tensors).

Tie rule (all functions): an item ranks behind every competitor whose score is greater than **or
equal** to its own, so ties count against the model ("pessimistic" ranking). The rank of the correct
item is ``#{competitors with score >= its score}`` (0 = first) and it is in the top k when that rank
is < k. A constant scorer therefore gets recall 0 below k = N instead of credit for the order of the
list, and the result never depends on the order of the inputs. With real-valued embeddings exact ties
are rare; this only makes degenerate cases well-defined.

Keys follow clip_benchmark: ``acc{k}``, ``mean_per_class_recall``; ``text_retrieval_recall@k``
(image -> text, I2T) and ``image_retrieval_recall@k`` (text -> image, T2I). Values are fractions.

Undefined k: with fewer than k candidates (classes for ``acc{k}``, texts for I2T, images for T2I) a top-k
figure says nothing (every item is in the top k) and the value is ``None`` (JSON null). clip_benchmark
reports ``acc5`` as NaN below 5 classes (``zeroshot_classification.evaluate``) and its retrieval
``torch.topk`` refuses k above the candidates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def target_rank(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pessimistic rank of each row's target column.

    Args:
        scores: (N, C) scores (higher = better).
        targets: (N,) int64 column of the correct item per row.

    Returns:
        (N,) int64: the number of other columns scoring >= the target's score.
    """
    target_scores = scores.gather(1, targets[:, None])
    return (scores >= target_scores).sum(dim=1) - 1


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)
                           ) -> dict[str, float]:
    """Top-k accuracy (``acc{k}``, k clipped to C) and mean per-class recall (``mean_per_class_recall``).

    Args:
        logits: (N, C) class scores.
        targets: (N,) int64 true class indices.

    Returns:
        ``acc{k}`` for each k (None when k > C: undefined, module doc), and the mean over the classes present in
        ``targets`` of the fraction of that class's samples whose top-1 prediction is right (balanced accuracy;
        absent classes skipped).
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1] or logits.shape[0] == 0:
        raise ValueError(f"need logits (N, C) with N > 0 and targets (N,), got {tuple(logits.shape)}, "
                         f"{tuple(targets.shape)}")
    rank = target_rank(logits, targets)
    out = {f"acc{k}": _fraction(rank < k) if k <= logits.shape[1] else None for k in ks}
    hit = (rank == 0).float()
    present = targets.unique()
    recalls = torch.stack([hit[targets == c].mean() for c in present])
    out["mean_per_class_recall"] = recalls.mean().item()
    return out


def retrieval_metrics(scores: torch.Tensor, caption_image: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
                      ) -> dict[str, float]:
    """Image-text retrieval recall@k with any number of captions per image (one image per caption).

    Args:
        scores: (I, T) image-caption similarities.
        caption_image: (T,) int64 index of each caption's image.

    Returns:
        ``text_retrieval_recall@k`` (I2T): fraction of images (with at least one caption) for which ANY
        of their captions is in the top k captions, i.e. the best-scored own caption has fewer than k
        other images' captions scoring >= it; ``image_retrieval_recall@k`` (T2I): fraction of captions
        whose own image is in the top k images. Ties count against (module docstring).
    """
    n_images, n_captions = scores.shape
    if caption_image.shape != (n_captions,) or n_captions == 0:
        raise ValueError(f"need caption_image ({n_captions},) for scores {tuple(scores.shape)}")
    if caption_image.min() < 0 or caption_image.max() >= n_images:
        raise ValueError("caption_image holds an index outside the image rows")
    own = caption_image[None, :] == torch.arange(n_images, device=scores.device)[:, None]  # (I, T)
    return multi_positive_retrieval_metrics(scores, own, ks)


def multi_positive_retrieval_metrics(scores: torch.Tensor, positives: torch.Tensor,
                                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Retrieval recall@k where an image may match several texts and a text several images.

    The general form of ``retrieval_metrics`` (which is the case "every text has exactly one image"); the
    grouped protocol of ``model.eval.retrieval`` uses it with one text per distinct caption string, whose
    positives are all images carrying that string.

    Args:
        scores: (I, T) image-text similarities.
        positives: (I, T) bool, True where text t is a correct match of image i; every text needs at
            least one positive image (images without a positive text are skipped for I2T).

    Returns:
        ``text_retrieval_recall@k`` (I2T): fraction of images with a positive text for which the
        best-scored positive text has fewer than k negative texts scoring >= it (i.e. ANY positive text in
        the top k); ``image_retrieval_recall@k`` (T2I): the same per text over images. Other positives never
        count against a hit; ties with negatives do (module docstring). None when k exceeds the texts (I2T)
        or the images (T2I).
    """
    if positives.shape != scores.shape or positives.dtype != torch.bool or scores.ndim != 2:
        raise ValueError(f"need bool positives of shape {tuple(scores.shape)}, got {tuple(positives.shape)} "
                         f"{positives.dtype}")
    if scores.shape[1] == 0 or not positives.any(dim=0).all():
        raise ValueError("every text needs at least one positive image")
    neg_inf = float("-inf")
    has_text = positives.any(dim=1)
    best_text = scores.masked_fill(~positives, neg_inf).max(dim=1).values  # (I,)
    i2t_rank = ((scores >= best_text[:, None]) & ~positives).sum(dim=1)[has_text]
    best_image = scores.masked_fill(~positives, neg_inf).max(dim=0).values  # (T,)
    t2i_rank = ((scores >= best_image[None, :]) & ~positives).sum(dim=0)
    out = {}
    n_images, n_texts = scores.shape
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = _fraction(t2i_rank < k) if k <= n_images else None
        out[f"text_retrieval_recall@{k}"] = _fraction(i2t_rank < k) if k <= n_texts else None
    return out


def _fraction(hits: torch.Tensor) -> float:
    return hits.float().mean().item()
