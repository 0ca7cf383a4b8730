"""Other input sizes (position-embedding resampling, EVA02 rotary tables) and MaskCLIP's value-embedding path."""

from __future__ import annotations

import pytest
import timm
import torch

from model.convpass import add_convpass
from model.factory import create_umg_clip

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_umg_clip("umg-tiny-vit").eval()


@pytest.fixture(scope="module")
def eva():
    torch.manual_seed(0)
    return create_umg_clip("umg-tiny-eva").eval()


def test_vit_takes_other_sizes_with_resampled_position_embeddings(vit):
    tokens = vit.tokens
    assert tokens.positional_embedding(8, 8) is vit.clip.visual.positional_embedding  # native grid: as it is
    pos = tokens.positional_embedding(12, 16)
    assert pos.shape == (1 + 12 * 16, 64)
    assert torch.equal(pos[0], vit.clip.visual.positional_embedding[0])  # the class token's stays
    with torch.no_grad():
        _, grid = vit.encode_image(torch.randn(2, 3, 192, 256))
        saved = vit.clip.visual.positional_embedding.detach().clone()
        vit.clip.visual.positional_embedding.fill_(0.25)
        try:
            flat = tokens.positional_embedding(12, 16)
        finally:
            vit.clip.visual.positional_embedding.copy_(saved)
    assert grid.shape == (2, 12, 16, 64)
    assert torch.allclose(flat, torch.full_like(flat, 0.25), atol=1e-6)  # bicubic keeps a constant field
    with pytest.raises(ValueError, match="multiple of the patch size"):
        vit.encode_image(torch.randn(1, 3, 130, 128))


def test_eva_rotary_table_for_another_grid_equals_timms_own_at_that_size(eva):
    reference = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=(168, 224), num_classes=0)
    images = torch.randn(1, 3, 168, 224)
    with torch.no_grad():
        x, rope, hw = eva.tokens._embed(images)
        native = eva.encode_image(torch.ones(1, 3, 112, 112))[1]
        eva.encode_image(images)  # must leave the tower's own tables as they were
        again = eva.encode_image(torch.ones(1, 3, 112, 112))[1]
    assert hw == (12, 16) and x.shape == (1, 1 + 12 * 16, 192)
    assert torch.allclose(rope, reference.rope.get_embed(), atol=1e-6)
    assert torch.equal(native, again)


def test_convpass_adapters_follow_the_grid_of_each_forward(eva):
    model = add_convpass(create_umg_clip("umg-tiny-eva"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter_" in name:
                p.normal_(std=0.05)
        _, grid = model.eval().encode_image(torch.randn(1, 3, 168, 224))
    assert grid.shape == (1, 12, 16, 192) and torch.isfinite(grid).all()


def test_value_last_block_is_maskclips_value_path_by_hand(vit):
    """Last block with identity attention = out_proj(v_proj(ln_1(x))) + x, then + mlp(ln_2(.)) (MaskCLIP)."""
    block = vit.clip.visual.transformer.resblocks[-1]
    captured = {}
    hook = block.register_forward_pre_hook(lambda module, args: captured.setdefault("x", args[0].detach()))
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        try:
            _, grid = vit.encode_image(images, value_last_block=True)
        finally:
            hook.remove()
        _, plain = vit.encode_image(images)
        x = captured["x"]
        attn = block.attn
        width = x.shape[-1]
        h = block.ln_1(x)
        value = h @ attn.in_proj_weight[2 * width:].T + attn.in_proj_bias[2 * width:]
        y = x + block.ls_1(attn.out_proj(value))
        y = y + block.ls_2(block.mlp(block.ln_2(y)))
    assert grid.shape == plain.shape == (2, 8, 8, 64)
    assert torch.allclose(grid.reshape(2, 64, 64), y[:, 1:], atol=1e-5)
    assert not torch.allclose(grid, plain, atol=1e-3)


def test_value_last_block_on_eva_is_the_value_path_by_hand(eva):
    """EVA02 block (fused qkv, q/v biases, no k bias; rope only touches q and k): proj(norm(v)) replaces attention."""
    block = eva.tokens.trunk.blocks[-1]
    attn = block.attn
    assert attn.qkv is not None and attn.gate is None and block.gamma_1 is None  # the structure computed below
    captured = {}
    hook = block.register_forward_pre_hook(lambda module, args: captured.setdefault("x", args[0].detach()))
    images = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        try:
            value = eva.encode_image(images, value_last_block=True)[1]
        finally:
            hook.remove()
        plain = eva.encode_image(images)[1]
        x = captured["x"]
        width = x.shape[-1]
        v = torch.nn.functional.linear(block.norm1(x), attn.qkv.weight[2 * width:], attn.v_bias)
        y = x + attn.proj(attn.norm(v))
        y = y + block.mlp(block.norm2(y))
    assert value.shape == plain.shape == (1, 8, 8, width)
    assert torch.allclose(value.reshape(1, 64, width), y[:, eva.tokens.num_prefix:], atol=1e-5)
    assert not torch.allclose(value, plain, atol=1e-3)
