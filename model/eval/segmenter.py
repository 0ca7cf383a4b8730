"""Training-free open-vocabulary segmentation with a plain UMG-CLIP: a probe of dense alignment.

Every visual token of the (unclustered) grid goes through the image path's final norm + projection
(``umg.tokens.head``, the same head the region path uses: a 1 x 1 region), is L2-normalised and compared
by cosine with class-name text embeddings; ``softmax(logit_scale * cos)`` over the classes gives a
(C, h, w) probability map, upsampled bilinearly to the S x S input. No parameter is trained.

``dense_features``: ``"tokens"`` (default) takes the final-layer tokens as they are; ``"maskclip"`` runs the
last block with MaskCLIP's value-embedding path (``UMGCLIP.encode_image(value_last_block=True)``: each token
attends only to itself there), the usual training-free baseline for CLIP dense prediction (Zhou et al.
2022). Class names with synonyms ("building, edifice") score the max over them (``model.dense.vocabulary``).

Panoptic output is a baseline derived from the semantic argmax: each *stuff* class present is one
segment; each *thing* class is split into 8-connected components (``skimage.measure.label``), which
separates instances only where they do not touch. Segments smaller than ``min_area`` input pixels are
dropped to VOID (0); a segment's score is its mean winning probability.

``TrainingFreeSegmenter`` has the interface of an adapted dense model (``model.adapted``), so
``umg eval seg`` treats both alike.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from skimage.measure import label as connected_components
from torch import nn

from model.dense.vocabulary import class_logits

DENSE_FEATURES = ("tokens", "maskclip")

class TrainingFreeSegmenter(nn.Module):
    """Dense classification of a UMG-CLIP's token grid against text embeddings (module docstring)."""

    def __init__(self, umg: nn.Module, min_area: int = 16, dense_features: str = "tokens"):
        super().__init__()
        if dense_features not in DENSE_FEATURES:
            raise ValueError(f"dense_features {dense_features!r} not in {DENSE_FEATURES}")
        self.umg = umg
        self.min_area = min_area
        self.dense_features = dense_features

    @torch.no_grad()
    def dense_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, h, w, E) normalised per-token embeddings in the joint space."""
        maskclip = {"value_last_block": True} if self.dense_features == "maskclip" else {}
        _, grid = self.umg.encode_image(images, **maskclip)
        return F.normalize(self.umg.tokens.head(grid).float(), dim=-1)

    @torch.no_grad()
    def segment_semantic(self, images: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images, (C, E) or (C, K, E) normalised text -> (B, C, S, S) class probabilities."""
        scale = float(self.umg.logit_scale_exp()) if hasattr(self.umg, "logit_scale_exp") else 100.0
        logits = scale * class_logits(self.dense_embeddings(images), text_emb.float()).permute(0, 3, 1, 2)
        return F.interpolate(logits.softmax(dim=1), size=images.shape[-2:], mode="bilinear", align_corners=False)

    @torch.no_grad()
    def segment_panoptic(self, images: torch.Tensor, text_emb: torch.Tensor, thing_mask: torch.Tensor
                         ) -> list[tuple[torch.Tensor, list[dict]]]:
        """Panoptic baseline from the semantic argmax.

        Args:
            images: (B, 3, S, S); text_emb: (C, E) normalised; thing_mask: (C,) bool.

        Returns:
            per image ``(seg (S, S) int64 segment ids, 0 = void, segments)`` with segments
            ``{"id", "category_id" (class index), "isthing", "score"}``.
        """
        probs = self.segment_semantic(images, text_emb)
        best, labels = probs.max(dim=1)
        return [semantic_to_panoptic(lab.cpu().numpy(), sc.cpu().numpy(), thing_mask.cpu().numpy(), self.min_area)
                for lab, sc in zip(labels, best, strict=True)]


def semantic_to_panoptic(labels: np.ndarray, scores: np.ndarray, thing_mask: np.ndarray, min_area: int = 0
                         ) -> tuple[torch.Tensor, list[dict]]:
    """(H, W) class map + (H, W) scores -> segment map and segments (stuff: one per class; things:
    8-connected components); segments under ``min_area`` pixels become VOID (0)."""
    seg = np.zeros(labels.shape, dtype=np.int64)
    segments: list[dict] = []
    for cls in np.unique(labels).tolist():
        isthing = bool(thing_mask[cls])
        if isthing:
            components, count = connected_components(labels == cls, connectivity=2, return_num=True)
            masks = [components == k for k in range(1, count + 1)]
        else:
            masks = [labels == cls]
        for mask in masks:
            if mask.sum() < max(min_area, 1):
                continue
            segments.append({"id": len(segments) + 1, "category_id": int(cls), "isthing": isthing,
                             "score": float(scores[mask].mean())})
            seg[mask] = len(segments)
    return torch.from_numpy(seg), segments
