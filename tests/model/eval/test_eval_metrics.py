"""Classification and retrieval metrics against hand-computed cases, ties included."""

from __future__ import annotations

import pytest
import torch

from model.eval.metrics import (
    classification_metrics,
    multi_positive_retrieval_metrics,
    retrieval_metrics,
    target_rank,
)


def test_topk_and_mean_per_class_recall_by_hand():
    logits = torch.tensor([
        [0.9, 0.1, 0.0, 0.0],  # class 0: top-1 right
        [0.1, 0.9, 0.5, 0.0],  # class 2: second -> top-2 only
        [0.0, 0.0, 0.0, 0.0],  # class 3: four-way tie -> rank 3 (ties count against)
        [0.2, 0.7, 0.7, 0.1],  # class 1: tied with class 2 for first -> rank 1, not top-1
        [0.0, 0.8, 0.1, 0.3],  # class 1: right
    ])
    targets = torch.tensor([0, 2, 3, 1, 1])
    assert target_rank(logits, targets).tolist() == [0, 1, 3, 1, 0]
    out = classification_metrics(logits, targets, ks=(1, 2, 5))
    assert out["acc1"] == pytest.approx(2 / 5)
    assert out["acc2"] == pytest.approx(4 / 5)
    assert out["acc5"] is None  # k above C: undefined (clip_benchmark: NaN below 5 classes)
    # Per class: 0 -> 1/1, 1 -> 1/2, 2 -> 0/1, 3 -> 0/1 (classes present in targets only).
    assert out["mean_per_class_recall"] == pytest.approx((1 + 0.5 + 0 + 0) / 4)


def test_ties_do_not_depend_on_column_order():
    logits = torch.tensor([[1.0, 1.0, 0.0]])
    assert classification_metrics(logits, torch.tensor([0]))["acc1"] == 0.0
    assert classification_metrics(logits, torch.tensor([1]))["acc1"] == 0.0
    assert classification_metrics(logits, torch.tensor([1]), ks=(2,))["acc2"] == 1.0


def test_retrieval_with_several_captions_per_image_and_ties():
    # 3 images; captions 0,1 -> image 0; caption 2 -> image 1; captions 3,4,5 -> image 2.
    caption_image = torch.tensor([0, 0, 1, 2, 2, 2])
    scores = torch.tensor([
        # c0   c1   c2   c3   c4   c5
        [0.2, 0.9, 0.8, 0.1, 0.0, 0.0],  # image 0: own best c1 = 0.9, nothing else >= -> I2T rank 0
        [0.5, 0.5, 0.5, 0.6, 0.6, 0.0],  # image 1: own c2 = 0.5; c0, c1 tie, c3, c4 above -> rank 4
        [0.9, 0.0, 0.0, 0.3, 0.7, 0.7],  # image 2: best own 0.7 (c4, c5); c0 = 0.9 above -> rank 1
    ])
    out = retrieval_metrics(scores, caption_image, ks=(1, 2, 5))
    assert out["text_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert out["text_retrieval_recall@2"] == pytest.approx(2 / 3)
    assert out["text_retrieval_recall@5"] == 1.0  # 6 texts
    # T2I ranks per caption (column): c0 own img0 0.2 < 0.5, 0.9 -> 2; c1 own 0.9 -> 0; c2 own img1 0.5
    # < 0.8 -> 1; c3 own img2 0.3 < 0.6 -> 1; c4 own 0.7 > 0.6 -> 0; c5 own 0.7 -> 0.
    assert out["image_retrieval_recall@1"] == pytest.approx(3 / 6)
    assert out["image_retrieval_recall@2"] == pytest.approx(5 / 6)
    assert out["image_retrieval_recall@5"] is None  # 3 images: undefined (clip_benchmark's topk refuses k > 3)


def test_retrieval_tie_with_another_image_counts_against():
    scores = torch.tensor([[0.5, 0.5], [0.5, 0.5]])  # constant scorer, one caption per image
    out = retrieval_metrics(scores, torch.tensor([0, 1]), ks=(1, 2))
    assert out["text_retrieval_recall@1"] == 0.0 and out["image_retrieval_recall@1"] == 0.0
    assert out["text_retrieval_recall@2"] == 1.0 and out["image_retrieval_recall@2"] == 1.0


def test_retrieval_skips_images_without_captions_for_i2t_and_checks_indices():
    scores = torch.tensor([[0.9], [0.1]])
    out = retrieval_metrics(scores, torch.tensor([0]), ks=(1,))
    assert out == {"image_retrieval_recall@1": 1.0, "text_retrieval_recall@1": 1.0}
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(scores, torch.tensor([2]), ks=(1,))


def test_grouped_texts_any_positive_counts_and_ties_with_negatives_count_against():
    # 3 images, 3 distinct texts: t0 is the caption of images 0 AND 1, t1 of image 1, t2 of image 2.
    positives = torch.tensor([[True, False, False], [True, True, False], [False, False, True]])
    scores = torch.tensor([
        # t0   t1   t2
        [0.9, 0.1, 0.5],  # image 0: own t0 0.9 best -> I2T rank 0
        [0.9, 0.2, 0.3],  # image 1: best own t0 0.9 (t1 is also its own, never counts) -> rank 0
        [0.2, 0.4, 0.4],  # image 2: own t2 0.4 ties with the negative t1 -> rank 1
    ])
    out = multi_positive_retrieval_metrics(scores, positives, ks=(1, 2))
    assert out["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert out["text_retrieval_recall@2"] == 1.0
    # T2I per text: t0 best own image 0.9 (images 0 and 1 tie, both positive) -> 0; t1 own image 1 0.2 <
    # image 2 0.4 -> 1; t2 own image 2 0.4 < image 0 0.5 -> 1.
    assert out["image_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert out["image_retrieval_recall@2"] == 1.0
    # The standard protocol on the same data (t0 written once per image) counts each copy of t0 under the
    # other image as a tie against: nothing is a hit at k = 1.
    standard = retrieval_metrics(scores[:, [0, 0, 1, 2]], torch.tensor([0, 1, 1, 2]), ks=(1,))
    assert standard == {"image_retrieval_recall@1": 0.0, "text_retrieval_recall@1": 0.0}


def test_one_positive_per_text_is_the_standard_protocol():
    scores = torch.randn(7, 12, generator=torch.Generator().manual_seed(0)).round(decimals=1)  # some ties
    caption_image = torch.tensor([0, 0, 1, 2, 2, 3, 4, 4, 5, 6, 6, 6])
    positives = caption_image[None, :] == torch.arange(7)[:, None]
    assert multi_positive_retrieval_metrics(scores, positives) == retrieval_metrics(scores, caption_image)


def test_grouped_retrieval_rejects_a_text_without_image_and_bad_shapes():
    with pytest.raises(ValueError, match="at least one positive image"):
        multi_positive_retrieval_metrics(torch.zeros(2, 2), torch.tensor([[True, False], [True, False]]))
    with pytest.raises(ValueError, match="bool positives of shape"):
        multi_positive_retrieval_metrics(torch.zeros(2, 2), torch.ones(2, 3, dtype=torch.bool))
