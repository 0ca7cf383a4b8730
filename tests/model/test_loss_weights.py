"""Weights of the two InfoNCE terms (the paper's "tag loss only" ablation needs them at 0)."""

import pytest
import torch
import torch.nn.functional as F

from data_schemas import TrainConfig
from model.losses import UMGLoss, total_loss


def _embeddings():
    torch.manual_seed(1)
    e = lambda n: F.normalize(torch.randn(n, 8), dim=-1).requires_grad_()
    return e(4), e(4), e(5), e(5), e(3), e(2)


def test_caption_weights_scale_the_contrastive_terms():
    img, cap, reg, regcap, tags, rtags = _embeddings()
    it, rt = torch.randint(0, 2, (4, 3)).float(), torch.randint(0, 2, (5, 2)).float()
    args = (img, cap, reg, regcap, tags, it, rtags, rt, torch.tensor(10.0))
    base = UMGLoss()(*args)
    scaled = UMGLoss(lambda_image_caption=0.5, lambda_region_caption=3.0)(*args)
    assert scaled["image_caption_loss"].item() == pytest.approx(0.5 * base["image_caption_loss"].item())
    assert scaled["region_caption_loss"].item() == pytest.approx(3.0 * base["region_caption_loss"].item())
    assert scaled["image_tag_loss"].item() == pytest.approx(base["image_tag_loss"].item())


def test_tag_only_sends_no_gradient_to_the_captions():
    img, cap, reg, regcap, tags, rtags = _embeddings()
    it, rt = torch.ones(4, 3), torch.ones(5, 2)
    out = UMGLoss(lambda_image_caption=0.0, lambda_region_caption=0.0)(
        img, cap, reg, regcap, tags, it, rtags, rt, torch.tensor(10.0))
    total_loss(out).backward()
    assert out["image_caption_loss"].item() == 0.0 and out["region_caption_loss"].item() == 0.0
    assert torch.count_nonzero(cap.grad) == 0 and torch.count_nonzero(regcap.grad) == 0
    assert torch.count_nonzero(img.grad) > 0 and torch.count_nonzero(reg.grad) > 0  # from the tag terms


def test_train_config_reads_the_weights_and_rejects_negative():
    cfg = TrainConfig.model_validate({"loss": {"lambda_image_caption": 0, "lambda_region_caption": 0}})
    assert cfg.loss.lambda_image_caption == 0.0 and TrainConfig().loss.lambda_region_caption == 1.0
    with pytest.raises(ValueError, match="lambda_image_caption"):
        TrainConfig.model_validate({"loss": {"lambda_image_caption": -1}})
