"""Dense adaptation (``umg adapt --task seg``): train the FC-CLIP-style head + Convpass on COCO masks.

The base checkpoint gets Convpass (backbone frozen), the dense head of ``model.dense.model`` goes on top,
and the pair trains with transformers' ``Mask2FormerLoss`` — Hungarian matching on class + point-sampled
mask costs, then class cross-entropy (no-object weight 0.1), sigmoid BCE and dice on the matched
masks, on the final decoder stage and (``head.aux_loss``) on every earlier one — weighted 2 / 5 / 5
(FC-CLIP). The classifier is the frozen text tower's prompt-ensembled embeddings of the training
vocabulary (computed once: the text tower does not train). AdamW with detectron2's multi-step decay
(FC-CLIP's, :func:`multistep_factor`) or warmup + cosine (``model.schedule``), global gradient clipping.
Data: COCO panoptic (things and stuff) or instances (``model.dense.data``), at the side ``input_size`` with
FC-CLIP's large-scale jitter or squashed like evaluation (``model.dense.augment``). Prompts: ``templates`` of the config, else the
``templates.txt`` next to the annotations (the eval layouts' file, so ``umg eval seg`` on the same data
builds identical class embeddings and recognises the seen classes), else FC-CLIP's ViLD templates; class
names split into synonyms at commas (``model.dense.vocabulary``).

Writes ``OUT/adapt.json`` + ``OUT/model.safetensors`` (``model.adapted``) and ``OUT/metrics.csv``. A
rerun starts over (the schedule is minutes long on the digit scenes; no resume).
"""

from __future__ import annotations

import csv
import logging
import math
import re
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

from data_schemas.adapt_config import AdaptedCheckpoint, SegAdaptConfig
from data_schemas.train_config import OptimSection
from model.adapted import AdaptResult, base_model, convpass_cfg, parameters_of, resolve_base, save_adapted
from model.convpass import add_convpass
from model.dense.augment import DenseTrainTransform
from model.dense.data import CocoSource, collate, dense_dataset
from model.dense.model import DenseUMG, mask2former_config
from model.dense.vocabulary import synonym_text_embeddings
from model.factory import tokenizer_for
from model.preprocess import preprocess_cfg, eval_transform, input_size
from model.schedule import build_optimizer, build_scheduler

log = logging.getLogger(__name__)
LOSS_TERMS = ("loss_cross_entropy", "loss_mask", "loss_dice")
_AUX_SUFFIX = re.compile(r"_\d+$")


def read_templates(cfg: SegAdaptConfig, source: CocoSource) -> list[str] | None:
    """The config's templates, else ``templates.txt`` beside the annotations, else None (ViLD's)."""
    if cfg.templates:
        return list(cfg.templates)
    if source.templates_file.is_file():
        lines = [t.strip() for t in source.templates_file.read_text(encoding="utf-8").splitlines()]
        return [t for t in lines if t] or None
    return None


def weighted_loss(losses: dict[str, torch.Tensor], cfg: SegAdaptConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of Mask2Former's terms (every stage) with FC-CLIP's weights; per-term sums of the final + aux stages."""
    weights = {"loss_cross_entropy": cfg.head.class_weight, "loss_mask": cfg.head.mask_weight,
               "loss_dice": cfg.head.dice_weight}
    total = sum(weights[_AUX_SUFFIX.sub("", key)] * value for key, value in losses.items())
    terms = {term: sum(float(v.detach()) for k, v in losses.items() if _AUX_SUFFIX.sub("", k) == term)
             for term in LOSS_TERMS}
    return total, terms


def multistep_factor(step: int, total: int, warmup: int, milestones: list[float], gamma: float) -> float:
    """detectron2 ``WarmupMultiStepLR`` (linear warmup from 0) as a LambdaLR factor; milestones are fractions
    of ``total`` steps."""
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    return warm * gamma ** sum(step >= round(m * total) for m in milestones)


def _scheduler(optimizer: torch.optim.Optimizer, optim: OptimSection, cfg: SegAdaptConfig):
    if cfg.lr_schedule == "cosine":
        return build_scheduler(optimizer, optim, cfg.steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: multistep_factor(
        step, cfg.steps, cfg.warmup_steps, cfg.lr_milestones, cfg.lr_gamma))


def train_transform(umg, cfg: SegAdaptConfig) -> tuple[DenseTrainTransform, int]:
    """The training geometry (``model.dense.augment``) at side T = ``cfg.input_size`` or the model's S."""
    side = cfg.input_size or input_size(umg)
    pre = preprocess_cfg(umg)
    return DenseTrainTransform(side, eval_transform(umg, side), pre["mean"], pre["std"], cfg.scale_range,
                               cfg.random_flip, torch.Generator().manual_seed(cfg.seed)), side


def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def _batches(loader: DataLoader):
    while True:
        yield from loader


def adapt_seg(cfg: SegAdaptConfig, base: str | Path, source: CocoSource, out_dir: str | Path) -> AdaptResult:
    """Train the dense model from the base checkpoint ``base`` on ``source``; write the adapted dir ``out_dir``."""
    torch.manual_seed(cfg.seed)
    device = _device(cfg.device)
    out_dir = Path(out_dir)
    section, base_config, provenance = resolve_base(base)
    umg = add_convpass(base_model(section, base_config, initial_weights=True, device=device),
                       convpass_cfg(cfg.convpass))
    transform, side = train_transform(umg, cfg)
    dataset = dense_dataset(source, transform, cfg.train_classes)
    log.info("dense adaptation on %s %s (%d images, %d classes) at %d px, %s", source.kind, source.annotations,
             len(dataset), len(dataset.classnames), side,
             f"scale jitter {cfg.scale_range}" if cfg.scale_range else "squashed like eval")
    text_emb = synonym_text_embeddings(umg.eval(), tokenizer_for(umg), dataset.classnames,
                                       read_templates(cfg, source)).to(device)
    model = DenseUMG(umg, cfg.head, cfg.ensemble, text_emb).to(device).train()
    loss_fn = Mask2FormerLoss(mask2former_config(cfg.head, len(dataset.classnames)), weight_dict={}).to(device)
    optim = OptimSection(name="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                         grad_clip_norm=cfg.grad_clip_norm)
    optimizer = build_optimizer(model, optim)
    scheduler = _scheduler(optimizer, optim, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(cfg.seed))
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = _batches(loader)
    with open(out_dir / "metrics.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", "loss", *LOSS_TERMS, "lr", "grad_norm"])
        writer.writeheader()
        for step in range(1, cfg.steps + 1):
            images, masks, labels = next(batches)
            images = images.to(device)
            masks, labels = [m.to(device) for m in masks], [c.to(device) for c in labels]
            with autocast:
                stages = model(images, text_emb)
            stages = [{k: v.float() for k, v in s.items()} for s in stages]
            final = stages[-1]
            losses = loss_fn(final["masks_queries_logits"], final["class_queries_logits"], masks, labels,
                             auxiliary_predictions=stages[:-1] if cfg.head.aux_loss else None)
            loss, terms = weighted_loss(losses, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm or math.inf)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            row = {"step": step, "loss": float(loss.detach()), **terms, "lr": lr, "grad_norm": float(norm)}
            writer.writerow(row)
            if step % cfg.log_every == 0 or step == cfg.steps:
                log.info("seg step %d/%d loss %.4f (%s)", step, cfg.steps, row["loss"],
                         ", ".join(f"{k} {terms[k]:.3f}" for k in LOSS_TERMS))
    model.eval()
    meta = AdaptedCheckpoint(task="seg", base_checkpoint=provenance, base_model=section,
                             open_clip_config=umg.open_clip_config, convpass=cfg.convpass, head=cfg.head,
                             ensemble=cfg.ensemble, classnames=dataset.classnames, parameters=parameters_of(model),
                             steps=cfg.steps, input_size=cfg.input_size)
    save_adapted(out_dir, model, meta)
    final_losses = {"loss": row["loss"], **terms}
    return AdaptResult(checkpoint=out_dir, steps=cfg.steps, trainable_params=meta.parameters.trainable,
                       total_params=meta.parameters.total, final_losses=final_losses)
