"""Convpass: zero-init equivalence (ViT, EVA), frozen backbone, gradients, resolutions, errors."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch

from model.convpass import (Convpass, ConvpassCfg, TokenGrid, add_convpass, convpass_disabled, count_parameters,
                            has_convpass)
from model.factory import create_umg_clip, get_tokenizer
from model.token_cluster import TokenClusterCfg
from model.umg_clip import UMGCLIP


pytestmark = pytest.mark.usefixtures("single_thread")


def _pair(name: str) -> tuple[UMGCLIP, UMGCLIP]:
    torch.manual_seed(0)
    base = create_umg_clip(name).eval()
    return base, add_convpass(copy.deepcopy(base), ConvpassCfg())


@pytest.mark.parametrize("name,size", [("umg-tiny-vit", 128), ("umg-tiny-eva", 112)])
def test_zero_init_adapted_model_equals_its_base_exactly(name, size):
    base, adapted = _pair(name)
    images = torch.randn(2, 3, size, size)
    boxes = torch.tensor([[0, 8.0, 8, 60, 70], [1, 20, 30, 100, 90]])
    with torch.no_grad():
        emb_b, grid_b = base.encode_image(images)
        emb_a, grid_a = adapted.encode_image(images)
        plain_a = adapted.clip.encode_image(images)  # open_clip's own path runs the adapters too
        plain_b = base.clip.encode_image(images)
    assert torch.equal(emb_a, emb_b) and torch.equal(grid_a, grid_b)
    assert torch.equal(plain_a, plain_b)
    hw = (size, size)
    assert torch.equal(adapted.encode_regions(grid_a, boxes, hw), base.encode_regions(grid_b, boxes, hw))
    blocks = 2 if name == "umg-tiny-vit" else 12
    assert sum(isinstance(m, Convpass) for m in adapted.modules()) == 2 * blocks


@pytest.mark.parametrize("name,size", [("umg-tiny-vit", 128), ("umg-tiny-eva", 112)])
def test_only_adapters_get_gradients_and_they_change_the_output(name, size):
    _, adapted = _pair(name)
    adapted.train()
    tokens = get_tokenizer(name)(["three", "a red five"])
    out = adapted(torch.randn(2, 3, size, size), tokens)
    (out["image_emb"] @ out["caption_emb"].T).sum().backward()
    with_grad = {n for n, p in adapted.named_parameters() if p.grad is not None}
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert with_grad and with_grad <= trainable
    assert all(".adapter_attn." in n or ".adapter_mlp." in n for n in trainable)
    # the zero up projection gets a gradient first; the rest follow once it moves
    assert any(n.endswith("adapter_mlp.up.weight") and adapted.get_parameter(n).grad.abs().sum() > 0 for n in with_grad)
    trainable_n, total_n = count_parameters(adapted)
    assert 0 < trainable_n < total_n
    assert trainable_n == sum(p.numel() for n, p in adapted.named_parameters() if n in trainable)
    with torch.no_grad():
        for name_, p in adapted.named_parameters():
            if name_.endswith("up.weight"):
                p.normal_(std=0.1)
        changed, _ = adapted.eval().encode_image(torch.zeros(1, 3, size, size) + 0.5)
        base_emb, _ = _pair(name)[0].encode_image(torch.zeros(1, 3, size, size) + 0.5)
    assert not torch.allclose(changed, base_emb)


def test_convpass_disabled_runs_the_frozen_base_exactly():
    base, adapted = _pair("umg-tiny-vit")
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("up.weight"):
                p.normal_(std=0.1)
        images = torch.randn(2, 3, 128, 128)
        with convpass_disabled(adapted):
            frozen, _ = adapted.encode_image(images)
        adapted_emb, _ = adapted.encode_image(images)
        base_emb, _ = base.encode_image(images)
    assert torch.equal(frozen, base_emb) and not torch.allclose(adapted_emb, base_emb)


def test_non_square_non_default_resolution():
    torch.manual_seed(0)
    clip = open_clip.create_model("umg-tiny-vit", force_image_size=(96, 160))
    base = UMGCLIP(clip).eval()
    adapted = add_convpass(copy.deepcopy(base))
    images = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        emb_b, grid_b = base.encode_image(images)
        emb_a, grid_a = adapted.encode_image(images)
    assert grid_a.shape == (1, 6, 10, 64) and torch.equal(emb_a, emb_b)
    grid = next(m for m in adapted.modules() if isinstance(m, Convpass)).grid
    assert grid.hw == (6, 10)


def test_prefix_token_runs_through_the_3x3_conv_as_a_1x1_image():
    torch.manual_seed(0)
    grid = TokenGrid(num_prefix=1)
    grid.hw = (2, 3)
    adapter = Convpass(16, grid, ConvpassCfg(dim=4, dropout=0.0)).eval()
    with torch.no_grad():
        adapter.conv.weight.normal_()
        adapter.up.weight.normal_()
        x = torch.randn(2, 7, 16)
        z = adapter.act(adapter.down(x[:, :1]))
        centre = adapter.conv.weight[:, :, 1, 1]
        expected = 0.1 * adapter.up(adapter.act(z @ centre.T + adapter.conv.bias))
        assert torch.allclose(adapter(x)[:, :1], expected, atol=1e-6)


def test_errors_clustering_twice_and_unrecorded_grid():
    torch.manual_seed(0)
    clustered = create_umg_clip("umg-tiny-vit", cluster=TokenClusterCfg(reduction=0.5, layer=1))
    with pytest.raises(ValueError, match="token clustering off"):
        add_convpass(clustered)
    adapted = add_convpass(create_umg_clip("umg-tiny-vit"))
    assert has_convpass(adapted)
    with pytest.raises(ValueError, match="already has Convpass"):
        add_convpass(adapted)
    adapted.cluster = TokenClusterCfg(reduction=0.5, layer=1)  # switched on afterwards
    with pytest.raises(RuntimeError, match="full token grid"):
        adapted.encode_image(torch.randn(1, 3, 128, 128))
    with pytest.raises(RuntimeError, match="no token grid recorded"):
        Convpass(8, TokenGrid(1), ConvpassCfg())(torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="dim"):
        ConvpassCfg(dim=0)
