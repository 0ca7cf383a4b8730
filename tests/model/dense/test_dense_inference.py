"""FC-CLIP inference functions against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from model.dense.inference import (
    geometric_ensemble,
    instance_inference,
    mask_pool,
    panoptic_inference,
    semantic_inference,
)


def test_mask_pool_means_features_under_positive_logits():
    features = torch.arange(8.0).view(1, 2, 2, 2)  # channel 0: 0 1 / 2 3, channel 1: 4 5 / 6 7
    logits = torch.tensor([[[[1.0, -1], [1, -1]], [[-1.0, -1], [-1, -1]]]])  # query 0: left column; query 1: none
    pooled, valid = mask_pool(features, logits)
    assert torch.allclose(pooled[0, 0], torch.tensor([1.0, 5.0])) and torch.equal(pooled[0, 1], torch.zeros(2))
    assert valid.tolist() == [[True, False]]


def test_geometric_ensemble_weights_seen_alpha_unseen_beta_and_keeps_void():
    p_in = torch.tensor([0.6, 0.3, 0.1])  # classes 0, 1 and void
    p_out = torch.tensor([0.2, 0.8])
    in_logits, out_logits = p_in.log().view(1, 1, 3), p_out.log().view(1, 1, 2)
    seen = torch.tensor([True, False])
    probs = geometric_ensemble(in_logits, out_logits, seen, alpha=0.4, beta=0.8)
    in_cls = torch.tensor([0.6, 0.3]) / 0.9
    raw = torch.stack([in_cls[0] ** 0.6 * p_out[0] ** 0.4, in_cls[1] ** 0.2 * p_out[1] ** 0.8])
    expected = torch.cat([raw / raw.sum() * 0.9, torch.tensor([0.1])])
    assert torch.allclose(probs[0, 0], expected, atol=1e-6) and probs.sum().item() == pytest.approx(1.0)
    # an empty mask (not valid) keeps the head's own probabilities
    alone = geometric_ensemble(in_logits, out_logits, seen, 0.4, 0.8, valid=torch.tensor([[False]]))
    assert torch.allclose(alone[0, 0], p_in, atol=1e-6)
    # alpha = beta = 1: only the frozen scores decide among classes
    frozen = geometric_ensemble(in_logits, out_logits, seen, 1.0, 1.0)
    assert torch.allclose(frozen[0, 0, :2], p_out * 0.9, atol=1e-6)


def test_semantic_inference_normalises_over_classes():
    probs = torch.tensor([[[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]]])  # 2 queries, 2 classes + void
    masks = torch.tensor([[[[10.0, -10.0]], [[-10.0, 10.0]]]])  # (1, 2, 1, 2): query 0 left, query 1 right
    sem = semantic_inference(probs, masks)
    assert sem.shape == (1, 2, 1, 2) and torch.allclose(sem.sum(1), torch.ones(1, 1, 2))
    assert sem.argmax(1).tolist() == [[[0, 1]]]
    s = 1 / (1 + math.exp(-10))
    left = torch.tensor([0.9 * s + 0.1 * (1 - s), 0.05 * s + 0.8 * (1 - s)])
    assert torch.allclose(sem[0, :, 0, 0], left / left.sum(), atol=1e-6)


def test_panoptic_inference_thresholds_overlaps_and_merges_stuff():
    big = 20.0
    masks = torch.full((4, 4, 4), -big)
    masks[0, :2, :2] = big   # thing, class 0, score 0.9
    masks[1, 2:, :2] = big   # thing, class 0, score 0.8: a second instance
    masks[2, :, 2:] = big    # stuff, class 1
    masks[3, :, 3:] = big    # stuff, class 1 again: merges into query 2's segment... if not hidden
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.1, 0.7, 0.2], [0.1, 0.6, 0.3]])
    seg, segments = panoptic_inference(probs, masks, torch.tensor([True, False]), 0.5, 0.8)
    assert [(s["category_id"], s["isthing"]) for s in segments] == [(0, True), (0, True), (1, False)]
    assert seg[:2, :2].unique().tolist() == [1] and seg[2:, :2].unique().tolist() == [2]
    assert seg[:, 2:].unique().tolist() == [3] and segments[0]["score"] == pytest.approx(0.9)
    # below the object threshold or void-best: nothing
    seg, segments = panoptic_inference(probs, masks, torch.tensor([True, False]), 0.95, 0.8)
    assert segments == [] and seg.eq(0).all()


def test_panoptic_overlap_test_uses_the_argmax_area_as_fc_clip():
    """Query 0 owns pixels 0-3 (sigmoid >= 0.5) but wins 0, 1, 4, 5: FC-CLIP compares the argmax area (4) with
    its own area (4) and keeps it; the intersection (2 / 4) would drop it."""
    masks = torch.tensor([[[3.0, 3, 3, 3, -0.4, -0.4]], [[-3.0, -3, 5, 5, -3, -3]]])  # (2, 1, 6)
    probs = torch.tensor([[0.9, 0.1], [0.95, 0.05]])  # one class + void
    seg, segments = panoptic_inference(probs, masks, torch.tensor([True]), 0.0, 0.8)
    assert [s["id"] for s in segments] == [1, 2]
    assert seg[0].tolist() == [1, 1, 2, 2, 0, 0]  # the segment itself is still won & own


def test_instance_inference_topk_pairs_things_only_and_mask_scores():
    masks = torch.tensor([[[2.0, 2.0, -1.0]], [[-3.0, 1.0, 1.0]]])  # (Q=2, 1, 3)
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])  # classes 0 (thing), 1 (stuff), void
    queries, scores, labels = instance_inference(probs, masks, torch.tensor([True, False]), topk=3)
    # top-3 pairs: (q0, c0) 0.6, (q1, c1) 0.5, (q0, c1) 0.3 -> only the thing pair stays
    assert labels.tolist() == [0] and queries.tolist() == [0]
    expected = 0.6 * (2 / (1 + math.exp(-2))) / 2
    assert scores.tolist() == pytest.approx([expected], rel=1e-5)
    queries, scores, labels = instance_inference(probs, masks, None, topk=10)  # capped at Q x C = 4 pairs
    assert sorted(zip(queries.tolist(), labels.tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1)]
