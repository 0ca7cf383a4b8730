import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from safetensors.torch import save_file

from model.factory import create_umg_clip, get_tokenizer, list_models, load_umg_checkpoint, save_umg_weights
from model.losses import UMGLoss, build_tag_targets, total_loss
from model.token_cluster import TokenClusterCfg
from model.umg_clip import UMGCLIP, make_token_adapter


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_umg_clip("umg-tiny-vit").eval()


def test_configs_are_registered_with_open_clip():
    assert {"umg-tiny-vit", "umg-tiny-eva"} <= set(list_models()) <= set(open_clip.list_models())
    assert get_tokenizer("umg-tiny-vit")(["a photo of a three"]).shape == (1, 32)


def test_encode_image_matches_open_clip_tower_bit_for_bit(vit):
    images = torch.randn(3, 3, 128, 128)
    with torch.no_grad():
        emb, grid = vit.encode_image(images)
        vit.clip.visual.output_tokens = True
        try:
            pooled, tokens = vit.clip.visual(images)
        finally:
            vit.clip.visual.output_tokens = False
    assert emb.shape == (3, 64) and grid.shape == (3, 8, 8, 64)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3))
    assert torch.equal(emb, F.normalize(pooled, dim=-1))
    assert torch.equal(vit.clip.visual.ln_post(grid.reshape(3, 64, 64)), tokens)  # grid = pre-ln_post tokens


def test_eva_tower_grid_and_embedding_match_timm():
    torch.manual_seed(0)
    model = create_umg_clip("umg-tiny-eva").eval()
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        emb, grid = model.encode_image(images)
        trunk = model.clip.visual.trunk
        features = trunk.forward_features(images)
        region = model.encode_regions(grid, torch.tensor([[1, 14.0, 28, 28, 42]]), (112, 112))
    assert grid.shape == (2, 8, 8, 192)
    assert torch.equal(emb, F.normalize(model.clip.visual(images), dim=-1))
    assert torch.equal(trunk.norm(grid.reshape(2, 64, 192)), features[:, 1:])
    assert torch.equal(region[0], F.normalize(trunk.head(trunk.norm(grid[1, 2, 1])), dim=-1))


def test_encode_text_and_logit_scale(vit):
    tokens = get_tokenizer("umg-tiny-vit")(["three", "a red three"])
    with torch.no_grad():
        text = vit.encode_text(tokens)
        assert torch.equal(text, vit.clip.encode_text(tokens, normalize=True))
    assert text.shape == (2, 64) and torch.allclose(text.norm(dim=-1), torch.ones(2))
    assert vit.logit_scale_exp().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        vit.clip.logit_scale.fill_(10.0)
    assert vit.logit_scale_exp().item() == 100.0
    vit.clamp_logit_scale_()
    assert vit.clip.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        vit.clip.logit_scale.fill_(math.log(1 / 0.07))


def test_forward_feeds_umg_loss_and_trains_all_towers():
    torch.manual_seed(0)
    model = create_umg_clip("umg-tiny-vit", cluster=TokenClusterCfg(reduction=0.75, layer=1))
    tok = get_tokenizer("umg-tiny-vit")
    boxes = [torch.tensor([[0.0, 0, 64, 64], [32, 32, 128, 96]]), torch.zeros(0, 4)]
    tag_vocab, tag_targets = build_tag_targets([["three", "red"], ["seven"]])
    region_vocab, region_targets = build_tag_targets([["three"], ["red"]])
    out = model(torch.randn(2, 3, 128, 128), tok(["a red three", "a seven"]), boxes, tok(["a three", "red"]),
                tok(tag_vocab), tok(region_vocab))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "image_emb": (2, 64), "caption_emb": (2, 64), "region_emb": (2, 64), "region_caption_emb": (2, 64),
        "image_tag_emb": (3, 64), "region_tag_emb": (2, 64), "logit_scale": ()}
    losses = UMGLoss()(**out, image_tag_targets=tag_targets, region_tag_targets=region_targets)
    total_loss(losses).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    for p in (model.clip.visual.conv1.weight, model.clip.visual.proj, model.clip.token_embedding.weight,
              model.clip.logit_scale):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_forward_without_regions_or_tags():
    model = create_umg_clip("umg-tiny-vit")
    out = model(torch.randn(1, 3, 128, 128), get_tokenizer("umg-tiny-vit")(["three"]))
    assert out["region_emb"] is None and out["image_tag_emb"] is None
    assert total_loss(UMGLoss()(**out)).isfinite()


def test_checkpoint_round_trips(tmp_path, vit):
    images = torch.randn(1, 3, 128, 128)
    save_umg_weights(vit, tmp_path / "umg.safetensors")
    torch.save({"model": vit.state_dict(), "step": 3}, tmp_path / "trainer.pt")
    with torch.no_grad():
        reference = vit.encode_image(images)[0]
        for path in ("umg.safetensors", "trainer.pt"):
            loaded = create_umg_clip("umg-tiny-vit", checkpoint=tmp_path / path).eval()
            assert torch.equal(loaded.encode_image(images)[0], reference)
        # pretrained = a local open_clip checkpoint (the EVA-CLIP initialisation path)
        save_file({k: v.contiguous() for k, v in vit.clip.state_dict().items()}, str(tmp_path / "clip.safetensors"))
        init = create_umg_clip("umg-tiny-vit", pretrained=str(tmp_path / "clip.safetensors")).eval()
        assert torch.equal(init.encode_image(images)[0], reference)
    with pytest.raises(RuntimeError):
        load_umg_checkpoint(create_umg_clip("umg-tiny-eva"), tmp_path / "umg.safetensors")


def test_unsupported_towers_fail_loudly():
    with pytest.raises(NotImplementedError, match="Linear"):
        make_token_adapter(torch.nn.Linear(2, 2))
    text_cfg = {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}
    vit_cfg = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16}
    attn_pool = CLIP(embed_dim=32, text_cfg=text_cfg, vision_cfg={
        **vit_cfg, "attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 2})
    with pytest.raises(NotImplementedError, match="attentional"):
        UMGCLIP(attn_pool)
    dropout = CLIP(embed_dim=32, vision_cfg={**vit_cfg, "patch_dropout": 0.5}, text_cfg=text_cfg)
    with pytest.raises(NotImplementedError, match="patch_dropout"):
        UMGCLIP(dropout)
    resnet = CLIP(embed_dim=32, text_cfg=text_cfg, vision_cfg={
        "image_size": 32, "timm_model_name": "resnet18", "timm_pool": "avg", "timm_proj": "linear"})
    with pytest.raises(NotImplementedError, match="ResNet"):
        UMGCLIP(resnet)


def test_token_clustering_is_off_in_eval_unless_asked_for():
    torch.manual_seed(0)
    clustered = create_umg_clip("umg-tiny-vit", cluster=TokenClusterCfg(reduction=0.75, layer=1)).eval()
    plain = create_umg_clip("umg-tiny-vit").eval()
    plain.load_state_dict(clustered.state_dict())
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        emb, grid = clustered.encode_image(images)
        emb_plain, grid_plain = plain.encode_image(images)
        assert torch.equal(emb, emb_plain) and torch.equal(grid, grid_plain)
        assert clustered.tokens.last_block_tokens == [65, 65]
        clustered.cluster_in_eval = True
        emb_c, grid_c = clustered.encode_image(images)
        assert clustered.tokens.last_block_tokens == [65, 17]
        assert not torch.allclose(emb_c, emb_plain) and not torch.allclose(grid_c, grid_plain)
        clustered.cluster_in_eval = False
        clustered.train()
        emb_t, _ = clustered.encode_image(images)  # training mode clusters (tiny model has no dropout)
        assert clustered.tokens.last_block_tokens == [65, 17] and torch.allclose(emb_t, emb_c, atol=1e-5)
