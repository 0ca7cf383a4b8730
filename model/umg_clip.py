"""UMG-CLIP: an open_clip model whose image tower also yields the visual token grid (paper §4.1).

``UMGCLIP`` wraps any open_clip CLIP/CustomTextCLIP. A small *token adapter* per vision-tower
family runs the tower so that it returns both the pooled image feature and the (B, h, w, D) grid of
visual tokens, optionally with token clustering (``model.token_cluster``) after block k:

- ``OpenClipViTTokens``: open_clip's own ``VisionTransformer`` (the tiny test configs, ViT-*).
- ``TimmEvaTokens``: open_clip ``TimmModel`` towers whose trunk is timm's ``Eva`` (EVA02-*, the
  paper's towers), including EVA02's rotary position embedding.

Region embeddings reuse the image path's final norm + projection (``adapter.head``): the grid holds
the tokens *before* whatever the image path applies after pooling, so a region covering the whole
grid of an average-pooled tower gives exactly the image embedding.

Input size: any multiple of the patch size. A grid other than the tower's own gets its absolute position
embeddings resampled bicubically (timm ``resample_abs_pos_embed``, as ViTDet / FC-CLIP-style dense heads do
when training at 1024) and EVA02's rotary embedding rebuilt for that grid.

``value_last_block``: the last block's self-attention sees only each token itself (an identity attention
mask), so its attention output is the token's own value embedding through the output projection — the
MaskCLIP trick (Zhou et al. 2022, ``return_qkv`` of their ViT backbone: ``v = out_proj(v_proj(ln_1(x))) +
x; v = v + mlp(ln_2(v))``), for training-free dense prediction. The rest of the block (residual, MLP,
layer scale, Convpass adapters) runs unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from timm.layers import resample_abs_pos_embed
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.regions import as_rois, pool_region_features
from model.token_cluster import TokenClusterCfg, run_blocks_with_clustering

LOGIT_SCALE_MAX = 100.0


def _run(block: nn.Module, checkpointed: bool, x: torch.Tensor, **kwargs) -> torch.Tensor:
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(block, x, use_reentrant=False, **kwargs)
    return block(x, **kwargs)


def self_only_attention_mask(num_tokens: int, like: torch.Tensor) -> torch.Tensor:
    """(N, N) additive mask, 0 on the diagonal and -inf elsewhere: each token attends to itself only, so
    softmax gives the identity and attention returns the value embeddings (MaskCLIP)."""
    mask = torch.full((num_tokens, num_tokens), float("-inf"), dtype=like.dtype, device=like.device)
    return mask.fill_diagonal_(0.0)


def _check_divisible(images: torch.Tensor, patch: tuple[int, int]) -> tuple[int, int]:
    """(h, w) token grid of ``images`` (B, 3, H, W) for a ``patch`` (ph, pw) tower."""
    height, width = images.shape[-2:]
    if height % patch[0] or width % patch[1]:
        raise ValueError(f"input {height}x{width} is not a multiple of the patch size {patch[0]}x{patch[1]}")
    return height // patch[0], width // patch[1]


class OpenClipViTTokens:
    """Token adapter for ``open_clip.transformer.VisionTransformer`` (holds a reference, no parameters).

    Mirrors ``VisionTransformer.forward`` (conv1 -> class + pos embed -> patch_dropout -> ln_pre ->
    transformer -> ln_post/pool -> proj) with the blocks run through the clustering runner.
    """

    num_prefix = 1

    def __init__(self, visual: VisionTransformer):
        if visual.attn_pool is not None:
            raise NotImplementedError("attentional pooling towers have no per-token projection for regions")
        if visual.pool_type not in ("tok", "avg"):
            raise NotImplementedError(f"pool_type {visual.pool_type!r}: need 'tok' or 'avg' for region pooling")
        if not isinstance(visual.patch_dropout, nn.Identity):
            raise NotImplementedError("patch_dropout drops grid positions; use token clustering instead")
        if not visual.transformer.batch_first:
            raise NotImplementedError("sequence-first transformer blocks are not supported")
        self.visual = visual
        # Average pooling normalises every token before pooling: the grid then holds normalised tokens.
        self.norm_in_grid = visual.pool_type == "avg" and not visual.final_ln_after_pool
        self.last_block_tokens: list[int] = []

    def positional_embedding(self, h: int, w: int) -> torch.Tensor:
        """(1 + h·w, D): the tower's position embedding, resampled bicubically for another grid."""
        v = self.visual
        if (h, w) == tuple(v.grid_size):
            return v.positional_embedding
        return resample_abs_pos_embed(v.positional_embedding[None], [h, w], list(v.grid_size), num_prefix_tokens=1)[0]

    def forward(self, images: torch.Tensor, cluster: TokenClusterCfg | None, value_last_block: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> pooled (B, E) (not normalised), token grid (B, h, w, D)."""
        v = self.visual
        _check_divisible(images, tuple(v.patch_size))
        x = v.conv1(images)  # (B, D, h, w)
        b, d, h, w = x.shape
        x = x.reshape(b, d, h * w).permute(0, 2, 1)
        x = torch.cat([v.class_embedding.view(1, 1, -1).expand(b, -1, -1).to(x.dtype), x], dim=1)
        x = x + self.positional_embedding(h, w).to(x.dtype)
        x = v.ln_pre(v.patch_dropout(x))
        ckpt = v.transformer.grad_checkpointing
        runners = [lambda x, _centers, blk=blk: _run(blk, ckpt, x) for blk in v.transformer.resblocks]
        if value_last_block:
            last = v.transformer.resblocks[-1]
            runners[-1] = lambda x, _centers: _run(last, ckpt, x, attn_mask=self_only_attention_mask(x.shape[1], x))
        x, self.last_block_tokens = run_blocks_with_clustering(runners, x, 1, (h, w), cluster)

        if v.final_ln_after_pool:
            pooled = x[:, 0] if v.pool_type == "tok" else x[:, 1:].mean(dim=1)
            pooled, grid = v.ln_post(pooled), x[:, 1:]
        else:
            normed = v.ln_post(x)
            pooled = normed[:, 0] if v.pool_type == "tok" else normed[:, 1:].mean(dim=1)
            grid = normed[:, 1:] if self.norm_in_grid else x[:, 1:]
        if v.proj is not None:
            pooled = pooled @ v.proj
        return pooled, grid.reshape(b, h, w, d)

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        """Final norm + projection of the image path. (..., D) -> (..., E)."""
        if not self.norm_in_grid:
            feats = self.visual.ln_post(feats)
        return feats @ self.visual.proj if self.visual.proj is not None else feats


class TimmEvaTokens:
    """Token adapter for open_clip ``TimmModel`` towers with a timm ``Eva`` trunk (EVA02 configs).

    Mirrors ``Eva.forward_features`` + ``forward_head`` + the adapter head. After clustering, each
    representative takes the rotary embedding of its cluster's centre token.
    """

    def __init__(self, visual: TimmModel):
        from timm.models.eva import Eva

        trunk = visual.trunk
        if not isinstance(trunk, Eva):
            raise NotImplementedError(
                f"timm trunk {type(trunk).__name__}: token grids are implemented for timm Eva (EVA02) trunks only; "
                "another family needs its own adapter (patch embed, prefix tokens, block call, head)")
        if trunk.attn_pool is not None or trunk.global_pool not in ("token", "avg"):
            raise NotImplementedError(f"timm global_pool {trunk.global_pool!r}: need 'token' or 'avg'")
        if trunk.patch_drop is not None or trunk.dynamic_img_size:
            raise NotImplementedError("patch dropout / dynamic image size change the token grid")
        if "pool" in visual.head._modules:
            raise NotImplementedError(f"timm_pool {type(visual.head.pool).__name__}: attention pools have no "
                                      "per-token projection for regions")
        self.visual = visual
        self.trunk = trunk
        self.num_prefix = trunk.num_prefix_tokens
        self.norm_in_grid = trunk.global_pool == "avg"
        self.last_block_tokens: list[int] = []

    def _block(self, index: int, block: nn.Module, rope: torch.Tensor | None, x: torch.Tensor,
               centers: torch.Tensor | None, **kwargs) -> torch.Tensor:
        if rope is not None and self.trunk.rope_mixed:
            if centers is not None:
                raise NotImplementedError("token clustering with per-depth ('mixed') RoPE")
            rope = rope[index]
        elif rope is not None and centers is not None:
            rope = rope[centers].unsqueeze(1)  # (B, 1, K, dim): one position per representative
        return _run(block, self.trunk.grad_checkpointing, x, rope=rope, **kwargs)

    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """Patch + position embeddings of ``images`` at any multiple of the patch size -> (tokens, rope, (h, w))."""
        t = self.trunk
        h, w = _check_divisible(images, tuple(t.patch_embed.patch_size))
        if (h, w) == tuple(t.patch_embed.grid_size):
            return (*t._pos_embed(t.patch_embed(images)), (h, w))
        if t.rope is not None and t.rope_mixed:
            raise NotImplementedError("another input size with per-depth ('mixed') RoPE")
        pe = t.patch_embed
        x = pe.norm(pe.proj(images).flatten(2).transpose(1, 2))
        pos = None if t.pos_embed is None else resample_abs_pos_embed(
            t.pos_embed, [h, w], list(pe.grid_size), num_prefix_tokens=0 if t.no_embed_class else t.num_prefix_tokens)
        rope = None
        if t.rope is not None:  # the cached rotary table is for the tower's grid: build it for (h, w), then restore
            own = list(t.rope.feat_shape)
            t.rope.update_feat_shape([h, w])
            try:
                rope = t.rope.get_embed()
            finally:
                t.rope.update_feat_shape(own)
        prefix = [tok.expand(x.shape[0], -1, -1) for tok in (t.cls_token, t.reg_token) if tok is not None]
        if t.no_embed_class:
            x = torch.cat([*prefix, x if pos is None else x + pos], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1)
            x = x if pos is None else x + pos
        return t.pos_drop(x), rope, (h, w)

    def forward(self, images: torch.Tensor, cluster: TokenClusterCfg | None, value_last_block: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> pooled (B, E) (not normalised), token grid (B, h, w, D)."""
        t = self.trunk
        x, rope, (h, w) = self._embed(images)
        x = t.norm_pre(x)
        runners = [partial(self._block, i, blk, rope) for i, blk in enumerate(t.blocks)]
        if value_last_block:
            last = len(t.blocks) - 1
            runners[-1] = lambda x, centers: self._block(last, t.blocks[last], rope, x, centers,
                                                         attn_mask=self_only_attention_mask(x.shape[1], x))
        x, self.last_block_tokens = run_blocks_with_clustering(runners, x, self.num_prefix, (h, w), cluster)
        normed = t.norm(x)
        pooled = self.visual.head(t.forward_head(normed))
        grid = (normed if self.norm_in_grid else x)[:, self.num_prefix:]
        return pooled, grid.reshape(x.shape[0], h, w, -1)

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        """Final norm + projection of the image path. (..., D) -> (..., E)."""
        t = self.trunk
        if not self.norm_in_grid:
            feats = t.norm(feats)
        return self.visual.head(t.head(t.head_drop(t.fc_norm(feats))))


def make_token_adapter(visual: nn.Module) -> OpenClipViTTokens | TimmEvaTokens:
    """Pick the token adapter for an open_clip vision tower."""
    if isinstance(visual, VisionTransformer):
        return OpenClipViTTokens(visual)
    if isinstance(visual, TimmModel):
        return TimmEvaTokens(visual)
    raise NotImplementedError(f"no token-grid adapter for vision tower {type(visual).__name__}")


class UMGCLIP(nn.Module):
    """open_clip model + token grid, region embeddings and optional token clustering.

    Args:
        clip: an open_clip ``CLIP``/``CustomTextCLIP`` (``open_clip.create_model(...)``).
        cluster: token clustering settings; None (or reduction 0) runs the plain tower.
        region_output_size: RoIAlign output side (bins are averaged), see ``model.regions``.
        cluster_in_eval: also cluster in ``eval()``. Off by default: clustering is a pre-training
            memory device (paper §4.1); inference uses the full token grid.

    ``open_clip_config`` is the resolved open_clip config (``{"model_cfg", "preprocess_cfg"}``) when the
    model was built by ``model.factory.create_umg_clip`` (None otherwise); checkpoints store it.

    The learnable temperature is the wrapped model's ``logit_scale`` (log scale, CLIP init
    log(1/0.07)); :meth:`logit_scale_exp` clamps its exp at 100.
    """

    def __init__(self, clip: nn.Module, *, cluster: TokenClusterCfg | None = None, region_output_size: int = 1,
                 cluster_in_eval: bool = False):
        super().__init__()
        self.clip = clip
        self.cluster = cluster
        self.cluster_in_eval = cluster_in_eval
        self.open_clip_config: dict | None = None
        self.region_output_size = region_output_size
        self.tokens = make_token_adapter(clip.visual)  # plain object: parameters stay under clip.visual

    def encode_image(self, images: torch.Tensor, *, value_last_block: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> normalised image embeddings (B, E), visual token grid (B, h, w, D).

        H and W: any multiples of the patch size (position embeddings resampled for another grid).
        Token clustering runs in training mode, and in eval mode only with ``cluster_in_eval``.
        ``value_last_block``: MaskCLIP's value-embedding path in the last block (module docstring).
        """
        cluster = self.cluster if self.training or self.cluster_in_eval else None
        if value_last_block and cluster is not None:
            raise ValueError("value_last_block needs the full token grid (token clustering off)")
        pooled, grid = self.tokens.forward(images, cluster, value_last_block)
        return F.normalize(pooled, dim=-1), grid

    def encode_regions(self, token_grid: torch.Tensor, boxes: torch.Tensor | Sequence[torch.Tensor],
                       image_size: tuple[int, int]) -> torch.Tensor:
        """Region embeddings from the token grid.

        Args:
            token_grid: (B, h, w, D) from :meth:`encode_image`.
            boxes: (M, 5) rois ``[batch_idx, x1, y1, x2, y2]`` in input pixels, or a list of B
                (N_i, 4) xyxy pixel boxes.
            image_size: (H, W) of the input images.

        Returns:
            (M, E) normalised region embeddings (M may be 0).
        """
        feats = pool_region_features(token_grid, as_rois(boxes).to(token_grid.device), tuple(image_size),
                                     output_size=self.region_output_size)
        return F.normalize(self.tokens.head(feats), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(T, L) token ids -> (T, E) normalised text embeddings."""
        return self.clip.encode_text(tokens, normalize=True)

    def logit_scale_exp(self) -> torch.Tensor:
        """exp(logit_scale) clamped at 100 (scalar)."""
        return self.clip.logit_scale.exp().clamp(max=LOGIT_SCALE_MAX)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the log temperature to [0, log 100] in place (call after each optimizer step)."""
        self.clip.logit_scale.clamp_(0, torch.log(torch.tensor(LOGIT_SCALE_MAX)).item())

    def forward(
        self,
        images: torch.Tensor,
        caption_tokens: torch.Tensor,
        rois: torch.Tensor | Sequence[torch.Tensor] | None = None,
        region_caption_tokens: torch.Tensor | None = None,
        image_tag_tokens: torch.Tensor | None = None,
        region_tag_tokens: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Everything the UMG loss needs, in one forward (so DDP sees a single call).

        Args:
            images: (B, 3, H, W).
            caption_tokens: (B, L) one image caption per image.
            rois: (M, 5) rois or per-image box lists (see :meth:`encode_regions`).
            region_caption_tokens: (M, L) one caption per region.
            image_tag_tokens: (T, L) the batch's image-tag vocabulary.
            region_tag_tokens: (T_r, L) the batch's region-tag vocabulary.

        Returns:
            dict with ``image_emb`` (B, E), ``caption_emb`` (B, E), ``region_emb`` (M, E),
            ``region_caption_emb`` (M, E), ``image_tag_emb`` (T, E), ``region_tag_emb`` (T_r, E)
            (None where the input was None) and ``logit_scale`` (scalar, exp'd and clamped). All
            embeddings are L2-normalised; the keys match ``UMGLoss``'s arguments.
        """
        image_emb, grid = self.encode_image(images)
        region_emb = self.encode_regions(grid, rois, images.shape[-2:]) if rois is not None else None
        texts = {"caption_emb": caption_tokens, "region_caption_emb": region_caption_tokens,
                 "image_tag_emb": image_tag_tokens, "region_tag_emb": region_tag_tokens}
        present = {k: v for k, v in texts.items() if v is not None}
        # One text-tower pass for all kinds of text.
        text_emb = self.encode_text(torch.cat(list(present.values()), dim=0))
        out: dict[str, torch.Tensor | None] = dict.fromkeys(texts)
        out.update(zip(present, text_emb.split([v.shape[0] for v in present.values()])))
        out.update(image_emb=image_emb, region_emb=region_emb, logit_scale=self.logit_scale_exp())
        return out
