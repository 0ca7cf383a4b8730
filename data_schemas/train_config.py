"""The ``train:`` section of a project config: everything one UMG-CLIP training run needs.

Read with ``load_config(path, overrides, model=TrainConfig, section="train")``. Values the paper
gives (§5.1: LAMB, weight decay, warmup + cosine, DeepSpeed, 10 epochs for B/L/g, λ = 1) are the
defaults where the extracted text kept them; everything else is marked "our default". Tensors and
model classes stay out of here (``data_schemas`` imports nothing of ours): ``model.trainer`` maps
these fields onto ``TokenClusterCfg``, ``UMGLoss``, ``model.lamb.Lamb`` (timm's LAMB math) and DeepSpeed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClusterSection(_Section):
    """Token clustering (paper §4.1, AiluRus); mirrors ``model.token_cluster.TokenClusterCfg``."""

    reduction: float = Field(default=0.0, ge=0.0, le=0.9, description="fraction of visual tokens removed (paper 0.75)")
    layer: int = Field(default=4, ge=0, description="blocks before clustering (ours: a third of a 12-block B/16 "
                       "tower; <= 5 of 12 for >= 40 % less memory at 75 % reduction)")
    k_neighbors: int = Field(default=5, ge=1, description="kNN density k (AiluRus/TCFormer: 5)")
    spatial_weight: float = Field(default=1.0, ge=0.0, description="weight of token position next to feature")


class ModelSection(_Section):
    """Which towers, from which weights."""

    name: str = Field(default="umg-tiny-vit", description="open_clip config name (model/configs or built-in)")
    pretrained: str | None = Field(
        default=None, description="open_clip tag (e.g. merged2b_s8b_b131k) or local open_clip checkpoint file")
    checkpoint: Path | None = Field(default=None, description="UMG-CLIP weights to start from (safetensors)")
    region_output_size: int = Field(default=1, ge=1, description="RoIAlign output side")
    image_size: int | None = Field(
        default=None, gt=0, description="input side overriding the model config's (e.g. 448 for EVA02-B-16; "
        "pretrained position embeddings are resampled); null = the config's")
    grad_checkpointing: bool = False
    cluster: ClusterSection = Field(default_factory=ClusterSection)


class DataSection(_Section):
    """Shard reading and augmentation (``model.data``). The input size is the model config's ``image_size``."""

    crop: Literal["random_resized", "center", "full"] = Field(
        default="random_resized", description="random_resized: train crop; center: square centre crop; full: "
        "whole image resized to a square (aspect not kept)")
    crop_scale: tuple[float, float] = Field(default=(0.9, 1.0), description="area fraction (open_clip/EVA-CLIP)")
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = Field(default=False, description="mirrored digits look odd: off for digit scenes")
    min_box_size: float = Field(default=4.0, ge=0.0, description="px on the network input; smaller boxes dropped")
    min_box_visible: float = Field(
        default=0.5, ge=0.0, le=1.0, description="box area fraction that must survive the crop (our default)")
    max_regions: int = Field(default=8, ge=0, description="regions per image; a seeded subset above this")
    kept_captions_only: bool = Field(default=True, description="sample only captions the CLIP filter kept")
    shuffle: bool = True
    shuffle_buffer: int = Field(default=1000, ge=1, description="samples in the per-worker shuffle buffer")
    shuffle_initial: int = Field(default=100, ge=1)
    resampled: bool = Field(default=False, description="sample shards with replacement per rank (multi-node)")
    samples_per_epoch: int | None = Field(
        default=None, gt=0, description="epoch length in resampled mode; null = samples listed in shard stats")
    workers: int = Field(default=2, ge=0, description="DataLoader worker processes per rank")

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError(f"need 0 < lo <= hi <= 1, got {list(value)}")
        return value

    @field_validator("crop_ratio")
    @classmethod
    def _ratio_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError(f"need 0 < lo <= hi, got {list(value)}")
        return value


class OptimSection(_Section):
    """LAMB with per-tower learning rates (EVA-CLIP recipe; the paper's numbers were lost in extraction)."""

    name: Literal["lamb", "adamw"] = "lamb"
    lr: float = Field(default=2e-4, gt=0, description="parameters outside both towers (logit_scale)")
    visual_lr: float | None = Field(default=None, gt=0, description="image tower; null = lr")
    text_lr: float | None = Field(default=None, gt=0, description="text tower; null = lr")
    visual_ld: float = Field(default=1.0, gt=0.0, le=1.0, description="layer-wise LR decay of the image tower "
                             "(EVA-CLIP --visual-ld; B/16: 0.75); 1 = off")
    text_ld: float = Field(default=1.0, gt=0.0, le=1.0, description="layer-wise LR decay of the text tower "
                           "(EVA-CLIP --text-ld; B/16: 0.75); 1 = off")
    weight_decay: float = Field(default=0.05, ge=0.0, description="not on norms, biases, position/class embeddings, "
                                "logit_scale (EVA-CLIP); the token embedding is decayed")
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(default=1e-6, gt=0)
    warmup_steps: int = Field(default=0, ge=0, description="linear warmup, then cosine to min_lr_ratio * lr")
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    grad_clip_norm: float | None = Field(default=1.0, gt=0, description="global L2 norm; null = no clipping")
    accum_steps: int = Field(default=1, ge=1, description="micro-batches per optimizer step")
    fused: bool | Literal["auto"] = Field(
        default="auto", description="LAMB step as one torch.compile'd function per tensor (model.lamb, ours): "
        "auto = compile, else eager with a warning; true = compile or fail; false = eager")
    lamb: Literal["timm", "deepspeed"] = Field(
        default="timm", description="LAMB math (model.lamb): deepspeed = DeepSpeed's FusedLamb as EVA-CLIP's "
        "pre-training ran it (the paper recipe, configs/umg41m_train*.yaml: trust ratio clamped to lamb_trust_range "
        "on every group, bias correction in the step size, per ZeRO partition under ZeRO); timm = timm.optim.Lamb "
        "(no trust ratio on no-decay groups, unclamped)")
    lamb_trust_range: tuple[float, float] = Field(
        default=(0.01, 10.0), description="lamb: deepspeed only: [min_coeff, max_coeff] of the trust ratio (EVA-CLIP)")


class LossSection(_Section):
    """Which UMG-CLIP loss terms run, and their weights (``model.losses.UMGLoss``)."""

    regions: bool = Field(default=True, description="region-caption and region-tag terms")
    tags: bool = Field(default=True, description="image- and region-tag terms")
    lambda_image_caption: float = Field(
        default=1.0, ge=0.0, description="weight of the image-caption InfoNCE (paper: 1; 0 = tag-only ablation)")
    lambda_region_caption: float = Field(
        default=1.0, ge=0.0, description="weight of the region-caption InfoNCE (paper: 1; 0 = tag-only ablation)")
    lambda_image_tag: float = Field(default=1.0, ge=0.0, description="paper: 1.0")
    lambda_region_tag: float = Field(default=1.0, ge=0.0, description="paper: 1.0")
    smooth_l1_beta: float = Field(default=1.0, gt=0.0, description="paper: not given; torch default")
    tag_vocab: Literal["global", "rank"] = Field(
        default="global", description="tag vocabulary of the whole global batch (ranks agree with one process; "
        "each rank encodes a slice of it) or of each rank's batch (no object all-gather)")
    duplicate_captions: Literal["mask", "multi_positive", "negatives"] = Field(
        default="mask", description="pairs whose captions are the same token sequence (compared across ranks): "
        "mask them out of each other's softmax (ours), uniform multi-positive targets, or CLIP's negatives")
    contrastive_chunk: int | None = Field(
        default=8192, ge=1, description="a contrastive term with more global columns than this streams its "
        "logsumexp over column chunks of this size (online logsumexp: O(local rows x chunk) memory, same value and "
        "gradients; the region term at paper scale, 5,120 x 163,840); null = the (local rows x N) logits whole")


class DistributedSection(_Section):
    """How ranks are launched and talk. torchrun (or a plain process) reads RANK/WORLD_SIZE/... from env."""

    launcher: Literal["torchrun", "ray"] = "torchrun"
    backend: Literal["auto", "nccl", "gloo"] = Field(default="auto", description="auto: nccl on CUDA, else gloo")
    timeout_s: int = Field(default=1800, gt=0)
    find_unused_parameters: bool = False
    ray_address: str | None = Field(default=None, description="null: start/attach a local Ray runtime")
    ray_num_workers: int = Field(default=1, ge=1)
    ray_use_gpu: bool | None = Field(default=None, description="null: use GPUs when the cluster has them")
    ray_cpus_per_worker: float = Field(default=1.0, gt=0)
    ray_storage_path: Path | None = Field(default=None, description="Ray Train storage (shared FS for multi-node)")


class DeepSpeedSection(_Section):
    """DeepSpeed ZeRO; the LAMB client optimizer is handed to the engine."""

    enabled: bool = False
    zero_stage: int = Field(
        default=1, ge=0, le=2, description="0-2; ZeRO-3 fails in DeepSpeed 0.19.8 on 0-dim parameters (logit_scale)")
    offload_optimizer: bool = Field(default=False, description="ZeRO-Offload of optimizer states to CPU")
    config: dict[str, Any] = Field(default_factory=dict, description="extra keys merged into the generated config")


class TrainConfig(_Section):
    """One training run. Batch sizes are per rank and per micro-step: the global batch of one optimizer
    step is ``batch_size * world_size * optim.accum_steps``."""

    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    loss: LossSection = Field(default_factory=LossSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    batch_size: int = Field(default=8, gt=0, description="images per rank per micro-step")
    steps: int | None = Field(default=None, gt=0, description="optimizer steps of the schedule")
    epochs: float | None = Field(default=None, gt=0, description="alternative to steps (paper: 10 for B/L/g)")
    run_steps: int | None = Field(
        default=None, gt=0, description="stop this invocation after this many steps (preemptible jobs); the "
        "schedule still spans `steps`; rerun with the same out dir to resume")
    precision: Literal["auto", "fp32", "bf16"] = Field(default="auto", description="auto: bf16 on CUDA, fp32 on CPU")
    device: str = Field(default="auto", description="auto: cuda:LOCAL_RANK when available, else cpu")
    seed: int = 0
    deterministic: bool = Field(default=False, description="torch.use_deterministic_algorithms(True)")
    resume: str = Field(default="auto", description="auto: latest checkpoint in the out dir; never; or a path")
    log_every: int = Field(default=10, gt=0, description="log line every n steps (CSV gets every step)")
    save_every: int = Field(default=0, ge=0, description="checkpoint every n steps; 0 = only at the end")
    keep_last: int = Field(default=2, ge=1, description="checkpoints kept in out/checkpoints")
    tensorboard: bool = Field(default=True, description="also write TensorBoard scalars when installed")
    progress: bool = Field(default=True, description="rich progress bar on rank 0")
    plot: bool = Field(default=True, description="loss-curve PNG at the end")

    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if (self.steps is None) == (self.epochs is None):
            if self.steps is None:
                self.steps = 100  # neither given: a short run
            else:
                raise ValueError("give either steps or epochs, not both")
        return self
