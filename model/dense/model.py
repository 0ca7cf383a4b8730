"""FC-CLIP-style open-vocabulary segmentation on a frozen + Convpass UMG-CLIP (paper §5, dense adaptation).

    image ─► UMG-CLIP tower with Convpass ─► token grid (B, h, w, D) ─► LayerNorm ─► simple feature
      pyramid (4×, 2×, 1×, ½×) ─► Mask2Former pixel decoder (multi-scale deformable attention + FPN; transformers'
      ``Mask2FormerPixelDecoder``) ─► masked-attention transformer decoder with learned queries
      (``Mask2FormerTransformerModule``) ─► per query and decoder layer: a mask (B, Q, H/4, W/4) and a class
      embedding (E) = MLP(query + proj(mask-pooled pixel features)) (FC-CLIP's head) ─► cosine logits against
      the class-name text embeddings plus a learned void embedding (in-vocabulary classifier); a class with
      synonyms ("building, edifice") scores the max over them (``model.dense.vocabulary``, FC-CLIP).

Inference adds FC-CLIP's geometric ensemble (``model.dense.inference``): the FROZEN model — the same tower
with its adapters switched off (``model.convpass.convpass_disabled``; the backbone is frozen, so this is
exactly the base checkpoint) — mask-pools its token grid under each predicted mask, projects it with the
region head (``umg.tokens.head``) and classifies it against the same text embeddings (out-of-vocabulary
scores); weights alpha for classes seen in training, beta for unseen ones.

Seen classes: the model keeps the text embeddings of its training vocabulary's synonyms (``seen_text_emb``,
made with the training prompts); a class passed at inference is "seen" when one of its synonyms' embeddings
matches one of them (cosine >= ``SEEN_COSINE``), i.e. same name and prompts — FC-CLIP's rule (a test class
is seen when it shares a synonym with a training class). ``segment_*(..., seen=...)`` overrides this.

Class text embeddings are (C, E) or (C, K, E) with K synonyms per class (``model.dense.vocabulary``).

transformers' Mask2Former modules take our pyramid as they are (their backbone is only a source of
four feature maps); the loss is transformers' ``Mask2FormerLoss`` (Hungarian matcher, point-sampled
mask BCE + dice, class CE with the no-object weight), see ``model.dense.train``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerMaskedAttentionDecoderLayer,
    Mask2FormerMLPPredictionHead,
    Mask2FormerPixelDecoder,
    Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention,
    Mask2FormerTransformerModule,
)

from data_schemas.adapt_config import AdaptedCheckpoint, DenseHeadSection, EnsembleSection
from model.convpass import convpass_disabled
from model.dense.inference import (
    geometric_ensemble,
    instance_inference,
    mask_pool,
    panoptic_inference,
    semantic_inference,
)
from model.dense.pyramid import SimpleFeaturePyramid
from model.dense.vocabulary import as_synonyms, class_logits, split_synonyms
from model.umg_clip import UMGCLIP

SEEN_COSINE = 0.9999  # same name, same prompts, same frozen text tower: equal up to float rounding


def mask2former_config(head: DenseHeadSection, num_labels: int) -> Mask2FormerConfig:
    """The Mask2Former settings of our head (sizes from ``head``; the loss weights too)."""
    return Mask2FormerConfig(
        feature_size=head.hidden_dim, mask_feature_size=head.hidden_dim, hidden_dim=head.hidden_dim,
        encoder_feedforward_dim=head.encoder_ffn_dim or head.ffn_dim, dim_feedforward=head.ffn_dim, encoder_layers=head.encoder_layers,
        decoder_layers=head.decoder_layers, num_attention_heads=head.num_heads, num_queries=head.num_queries,
        class_weight=head.class_weight, mask_weight=head.mask_weight, dice_weight=head.dice_weight,
        no_object_weight=head.no_object_weight, train_num_points=head.train_num_points,
        use_auxiliary_loss=head.aux_loss, num_labels=num_labels)


def _init_mask2former(module: nn.Module) -> None:
    """The parts of ``Mask2FormerPreTrainedModel._init_weights`` these modules rely on."""
    if isinstance(module, Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention):
        nn.init.zeros_(module.sampling_offsets.weight)
        thetas = torch.arange(module.n_heads).float() * (2.0 * math.pi / module.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(module.n_heads, 1, 1, 2)
        steps = torch.arange(1, module.n_points + 1).view(1, 1, -1, 1)
        grid = grid.repeat(1, module.n_levels, module.n_points, 1) * steps
        with torch.no_grad():
            module.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(module.attention_weights.weight)
        nn.init.zeros_(module.attention_weights.bias)
        for proj in (module.value_proj, module.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)
    elif isinstance(module, Mask2FormerMaskedAttentionDecoderLayer):
        for p in module.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.zeros_(module.cross_attn.in_proj_bias)
    elif isinstance(module, Mask2FormerPixelDecoder):
        nn.init.normal_(module.level_embed)


class DenseUMG(nn.Module):
    """Open-vocabulary mask classification on ``umg`` (module docstring).

    Args:
        umg: a UMG-CLIP with Convpass (``model.convpass.add_convpass``), frozen apart from the adapters.
        head, ensemble: settings (``data_schemas.adapt_config``).
        seen_text_emb: (C_train, E) normalised text embeddings of the training vocabulary.
    """

    def __init__(self, umg: UMGCLIP, head: DenseHeadSection, ensemble: EnsembleSection,
                 seen_text_emb: torch.Tensor):
        super().__init__()
        self.umg = umg
        self.head_cfg, self.ensemble = head, ensemble
        width = _token_width(umg)
        embed_dim = seen_text_emb.shape[-1]
        c = head.hidden_dim
        seen_text_emb = as_synonyms(seen_text_emb)
        config = mask2former_config(head, seen_text_emb.shape[0])
        self.grid_norm = nn.LayerNorm(width)
        self.pyramid = SimpleFeaturePyramid(width, c)
        self.pixel_decoder = Mask2FormerPixelDecoder(config, feature_channels=[c] * 4)
        self.decoder = Mask2FormerTransformerModule(in_features=c, config=config)
        self.mask_pool_proj = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, c))
        self.class_embed = Mask2FormerMLPPredictionHead(c, c, embed_dim)
        self.void_embedding = nn.Embedding(1, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # (C * K, E): every training synonym's embedding (K = 1: the (C, E) layout of older checkpoints)
        self.register_buffer("seen_text_emb", F.normalize(seen_text_emb.flatten(0, 1).float(), dim=-1))
        for module in self.modules():
            _init_mask2former(module)

    def head_parameters(self) -> list[nn.Parameter]:
        """Everything outside ``umg`` (all trainable)."""
        return [p for name, p in self.named_parameters() if not name.startswith("umg.")]

    def forward(self, images: torch.Tensor, text_emb: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Mask-classification outputs of every decoder stage, the last one final.

        Args:
            images: (B, 3, H, W); text_emb: (C, E) or (C, K, E) normalised class (synonym) embeddings.

        Returns:
            list of ``{"masks_queries_logits": (B, Q, H/4, W/4), "class_queries_logits": (B, Q, C + 1)}``
            (void last; mask side = 4x the token grid).
        """
        _, grid = self.umg.encode_image(images)
        pyramid = self.pyramid(self.grid_norm(grid).permute(0, 3, 1, 2))
        pixels = self.pixel_decoder(pyramid, return_dict=True)
        decoded = self.decoder(list(pixels.multi_scale_features), pixels.mask_features)
        void = F.normalize(self.void_embedding.weight, dim=-1)  # (1, E)
        scale = self.logit_scale.exp().clamp(max=100)
        outputs = []
        for hidden, masks in zip(decoded.intermediate_hidden_states, decoded.masks_queries_logits, strict=True):
            pooled, _ = mask_pool(pixels.mask_features, masks)
            embed = F.normalize(self.class_embed(hidden.transpose(0, 1) + self.mask_pool_proj(pooled)), dim=-1)
            logits = torch.cat([class_logits(embed, text_emb), embed @ void.T.to(embed.dtype)], dim=-1)
            outputs.append({"masks_queries_logits": masks, "class_queries_logits": scale * logits})
        return outputs

    @torch.no_grad()
    def out_of_vocab_logits(self, images: torch.Tensor, mask_logits: torch.Tensor, text_emb: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen model's mask-pooled class logits (B, Q, C) and which queries pooled anything (B, Q)."""
        with convpass_disabled(self.umg):
            _, grid = self.umg.encode_image(images)
        masks = F.interpolate(mask_logits, size=grid.shape[1:3], mode="bilinear", align_corners=False)
        pooled, valid = mask_pool(grid.permute(0, 3, 1, 2), masks)
        emb = F.normalize(self.umg.tokens.head(pooled), dim=-1)
        return self.umg.logit_scale_exp() * class_logits(emb, text_emb), valid

    def seen_classes(self, text_emb: torch.Tensor) -> torch.Tensor:
        """(C,) bool: one of the class's synonym embeddings matches a training synonym's (same name, prompts)."""
        cosine = as_synonyms(text_emb).float() @ self.seen_text_emb.T.to(text_emb.device)  # (C, K, C_train K_train)
        return (cosine.amax(dim=-1) >= SEEN_COSINE).any(dim=-1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, text_emb: torch.Tensor, seen: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ensembled class probabilities (B, Q, C + 1) and mask logits upsampled to the input (B, Q, H, W)."""
        final = self(images, text_emb)[-1]
        masks = final["masks_queries_logits"]
        out_logits, valid = self.out_of_vocab_logits(images, masks, text_emb)
        seen = self.seen_classes(text_emb) if seen is None else seen
        probs = geometric_ensemble(final["class_queries_logits"], out_logits, seen, self.ensemble.alpha,
                                   self.ensemble.beta, valid if self.ensemble.ensemble_on_valid_mask else None)
        return probs, F.interpolate(masks, size=images.shape[-2:], mode="bilinear", align_corners=False)

    @torch.no_grad()
    def segment_semantic(self, images: torch.Tensor, text_emb: torch.Tensor, seen: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """(B, 3, S, S), (C, E) -> (B, C, S, S) per-class scores summing to 1 over classes."""
        return semantic_inference(*self.predict(images, text_emb, seen))

    @torch.no_grad()
    def segment_panoptic(self, images: torch.Tensor, text_emb: torch.Tensor, thing_mask: torch.Tensor,
                         seen: torch.Tensor | None = None) -> list[tuple[torch.Tensor, list[dict]]]:
        """Per image ``(seg (S, S) int64, 0 = void, segments [{"id", "category_id", "isthing", "score"}])``."""
        probs, masks = self.predict(images, text_emb, seen)
        return [panoptic_inference(p, m, thing_mask, self.ensemble.object_mask_threshold,
                                   self.ensemble.overlap_threshold) for p, m in zip(probs, masks, strict=True)]

    @torch.no_grad()
    def segment_instances(self, images: torch.Tensor, text_emb: torch.Tensor, thing_mask: torch.Tensor | None,
                          seen: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per image ``(mask logits (K, H, W), scores (K,), labels (K,))``: FC-CLIP's instance output, the
        ``ensemble.instances_per_image`` best (query, class) pairs, thing classes only when ``thing_mask`` is
        given (a panoptic vocabulary); a mask is ``logit > 0`` (logits returned so callers can resize)."""
        probs, masks = self.predict(images, text_emb, seen)
        out = []
        for p, m in zip(probs, masks, strict=True):
            queries, scores, labels = instance_inference(p, m, thing_mask, self.ensemble.instances_per_image)
            out.append((m[queries], scores, labels))
        return out


def _token_width(umg: UMGCLIP) -> int:
    """D of the token grid."""
    tokens = umg.tokens
    return tokens.trunk.embed_dim if hasattr(tokens, "trunk") else tokens.visual.conv1.out_channels


def dense_model_from_meta(meta: AdaptedCheckpoint, umg: UMGCLIP) -> DenseUMG:
    """The dense model of an adapted checkpoint (weights loaded by the caller)."""
    if meta.head is None or meta.ensemble is None or not meta.classnames:
        raise ValueError("adapt.json of task seg needs head, ensemble and classnames")
    embed_dim = meta.open_clip_config["model_cfg"]["embed_dim"]
    synonyms = max(len(split_synonyms(name)) for name in meta.classnames)
    model = DenseUMG(umg, meta.head, meta.ensemble, torch.zeros(len(meta.classnames), synonyms, embed_dim))
    model.input_side = meta.input_size  # None: the base's S (model.preprocess.input_size)
    return model
