"""The ``adapt_global:`` and ``adapt_seg:`` sections of a project config (``umg adapt``, paper §4.2, §5.1).

Read with ``load_config(path, overrides, model=GlobalAdaptConfig, section="adapt_global")`` (or
``SegAdaptConfig`` / ``"adapt_seg"``). ``configs/adapt_smoke.yaml`` holds tiny CPU settings; the
defaults here are the paper's recipe where it gives one:

- global adaptation: Convpass PET trained with the image-level UMG losses (image–caption InfoNCE +
  image-tag smooth-L1; region terms off), LAMB, 5 epochs (paper §5.1 "5 epochs"; warmup, learning
  rate and weight decay are not given: ours are upstream Convpass's lr 1e-3 / wd 1e-4, cosine decay
  without warmup, see ``_global_train``).
- dense adaptation: FC-CLIP's recipe (AdamW lr 1e-4, wd 0.05, full-model gradient clipping at 0.01,
  multi-step decay x0.1 at 88.9 % and 96.3 % of the steps, Mask2Former loss weights class 2 / mask 5 /
  dice 5, no-object 0.1, geometric ensemble alpha 0.4 / beta 0.8, panoptic object threshold 0.0); the
  defaults keep the base model's input size without jitter and a small head (hidden 64, 20 queries, 2
  masked-attention layers) so the code runs anywhere: ``configs/adapt_fcclip.yaml`` holds FC-CLIP's
  size (1024, scale jitter 0.1-2.0, flip; head 256 / 250 queries / 9 layers; 368,750 steps of 16 =
  COCO panoptic 50 epochs, the paper's "FC-CLIP recipe, COCO Panoptic 50 epochs").
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from data_schemas.train_config import LossSection, ModelSection, OptimSection, TrainConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConvpassSection(_Section):
    """Convpass adapters (mirrors ``model.convpass.ConvpassCfg``)."""

    dim: int = Field(default=8, ge=1, description="adapter hidden width d (upstream Convpass: 8)")
    scale: float = Field(default=0.1, description="s, weight of the adapter branch (paper: 0.1)")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="before the up projection (upstream: 0.1)")


def _global_train() -> TrainConfig:
    return TrainConfig(epochs=5, loss=LossSection(regions=False),
                       optim=OptimSection(name="lamb", lr=1e-3, weight_decay=1e-4))


class GlobalAdaptConfig(_Section):
    """``umg adapt --task global``: the trainer's settings (its ``model`` section is replaced by the
    base checkpoint's, with clustering off, and ``loss.regions`` is forced off)."""

    convpass: ConvpassSection = Field(default_factory=ConvpassSection)
    train: TrainConfig = Field(default_factory=_global_train)


class DenseHeadSection(_Section):
    """The FC-CLIP-style head (``model.dense``): feature pyramid, Mask2Former pixel + transformer decoder."""

    hidden_dim: int = Field(default=64, ge=32, description="pixel decoder / query width (multiple of 32: GroupNorm)")
    num_queries: int = Field(default=20, ge=1, description="learned object queries (FC-CLIP: 250)")
    encoder_layers: int = Field(default=2, ge=1, description="deformable pixel-decoder layers (FC-CLIP: 6)")
    decoder_layers: int = Field(
        default=3, ge=2, description="prediction stages, transformers' convention: the initial query prediction + "
        "decoder_layers - 1 masked-attention layers (FC-CLIP's 9 layers = 10)")
    num_heads: int = Field(default=4, ge=1)
    ffn_dim: int = Field(default=128, ge=1, description="decoder feed-forward width (Mask2Former: 2048)")
    encoder_ffn_dim: int | None = Field(default=None, ge=1, description="pixel-decoder feed-forward width; null = "
                                        "ffn_dim (Mask2Former's MSDeformAttn encoder: 1024)")
    class_weight: float = Field(default=2.0, ge=0.0, description="Mask2Former/FC-CLIP: 2.0")
    mask_weight: float = Field(default=5.0, ge=0.0, description="Mask2Former/FC-CLIP: 5.0")
    dice_weight: float = Field(default=5.0, ge=0.0, description="Mask2Former/FC-CLIP: 5.0")
    no_object_weight: float = Field(default=0.1, ge=0.0, description="Mask2Former/FC-CLIP: 0.1")
    train_num_points: int = Field(default=1024, ge=16, description="sampled mask points (Mask2Former: 12544)")
    aux_loss: bool = Field(default=True, description="deep supervision on every decoder layer")


class EnsembleSection(_Section):
    """FC-CLIP inference: geometric ensemble of in-vocabulary and frozen out-of-vocabulary scores."""

    alpha: float = Field(default=0.4, ge=0.0, le=1.0, description="weight of the frozen scores, seen classes")
    beta: float = Field(default=0.8, ge=0.0, le=1.0, description="weight of the frozen scores, unseen classes")
    object_mask_threshold: float = Field(
        default=0.0, ge=0.0, le=1.0, description="panoptic: keep queries whose best class score exceeds this "
        "(FC-CLIP's configs: 0.0; Mask2Former's COCO base: 0.8)")
    overlap_threshold: float = Field(default=0.8, ge=0.0, le=1.0,
                                     description="panoptic: argmax area / own mask area needed (FC-CLIP: 0.8)")
    ensemble_on_valid_mask: bool = Field(
        default=False, description="frozen scores off for queries whose mask is empty at the token grid "
        "(FC-CLIP's ENSEMBLE_ON_VALID_MASK; off in its configs)")
    instances_per_image: int = Field(default=100, ge=1,
                                     description="instance output: top (query, class) pairs (FC-CLIP: 100)")


class SegAdaptConfig(_Section):
    """``umg adapt --task seg``: the dense model's head, loss, training geometry and AdamW schedule."""

    convpass: ConvpassSection = Field(default_factory=ConvpassSection)
    head: DenseHeadSection = Field(default_factory=DenseHeadSection)
    ensemble: EnsembleSection = Field(default_factory=EnsembleSection)
    train_classes: list[str] | None = Field(default=None, description="training vocabulary; null = all categories")
    templates: list[str] | None = Field(default=None, description="prompt templates with {}; null = built-in")
    input_size: int | None = Field(default=None, gt=0, description="training side T (a multiple of the patch "
                                   "size); null = the base model's S. FC-CLIP: 1024. Evaluation squashes to it too")
    scale_range: tuple[float, float] | None = Field(
        default=None, description="large-scale jitter (min, max) (FC-CLIP: [0.1, 2.0]); null = squash to T x T")
    random_flip: bool = Field(default=True, description="horizontal flip with the jitter (FC-CLIP: yes)")
    steps: int = Field(default=300, gt=0, description="FC-CLIP COCO panoptic: 368,750 (50 epochs at batch 16)")
    batch_size: int = Field(default=4, gt=0, description="FC-CLIP: 16")
    lr: float = Field(default=1e-4, gt=0, description="FC-CLIP: AdamW 1e-4")
    weight_decay: float = Field(default=0.05, ge=0.0, description="FC-CLIP: 0.05")
    lr_schedule: Literal["multistep", "cosine"] = Field(
        default="multistep", description="multistep: x lr_gamma at each milestone (detectron2 WarmupMultiStepLR, "
        "FC-CLIP's); cosine: warmup + cosine to 0")
    lr_milestones: list[float] = Field(default=[327778 / 368750, 355092 / 368750],
                                       description="multistep: fractions of steps (FC-CLIP: steps 327,778 and 355,092)")
    lr_gamma: float = Field(default=0.1, gt=0, description="multistep decay factor (detectron2: 0.1)")
    warmup_steps: int = Field(default=0, ge=0, description="linear warmup (FC-CLIP: 10 iterations at factor 1.0 = none)")
    grad_clip_norm: float | None = Field(default=0.01, gt=0, description="global L2 norm (FC-CLIP: full_model 0.01)")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: str = Field(default="auto", description="auto: cuda when available, else cpu")
    seed: int = 0
    log_every: int = Field(default=10, gt=0)


class AdaptedParameters(_Section):
    trainable: int
    total: int


class AdaptedCheckpoint(_Section):
    """``adapt.json`` of an adapted checkpoint dir (``model.adapted``): everything to rebuild the model.

    ``base_model`` and ``open_clip_config`` (open_clip's ``{"model_cfg", "preprocess_cfg"}``) make
    the directory self-contained: the base checkpoint may move or vanish. ``base_checkpoint`` is
    provenance only.
    """

    format_version: Literal[1] = 1
    task: Literal["global", "seg"]
    base_checkpoint: str
    base_model: ModelSection
    open_clip_config: dict
    convpass: ConvpassSection
    head: DenseHeadSection | None = None
    ensemble: EnsembleSection | None = None
    classnames: list[str] | None = Field(default=None, description="the vocabulary the head was trained on")
    input_size: int | None = Field(default=None, description="seg: side the head trained at (eval squashes to it)")
    parameters: AdaptedParameters
    steps: int
