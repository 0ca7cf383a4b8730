"""The UMG-CLIP trainer: ``train(cfg, shards, out_dir)`` is what ``umg train`` and the Prefect flow call.

One optimizer step = ``optim.accum_steps`` micro-batches of ``batch_size`` images per rank. Each
micro-batch runs ``UMGCLIP.forward`` once (DDP / DeepSpeed see a single call), ``UMGLoss`` on its
outputs (contrastive terms over the global batch; tag terms over the global tag vocabulary when
``loss.tag_vocab == "global"``), backward of the summed terms. Then: global gradient clipping, LAMB
step, per-step warmup + cosine, ``clamp_logit_scale_()``. Gradient accumulation sums micro-batch
gradients: negatives come from the micro-batch (times the ranks), not from the whole step.

Rank agreement: every rank must run the same number of steps, so with ``world_size > 1`` ranks
all-reduce "I still have a batch" before each micro-batch and start the next epoch together.

Outputs in ``out_dir``: ``checkpoints/`` (``model.checkpoint``), ``metrics.csv`` (one row per
step), ``tb/`` (TensorBoard, when installed), ``loss_curve.png``.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data_schemas.train_config import TrainConfig
from model.checkpoint import (
    DEEPSPEED,
    WEIGHTS,
    latest_checkpoint,
    load_train_state,
    model_from_config,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from model.data import RegionBatch, TextTokens, TransformSpec, count_samples, make_dataset, make_loader
from model.factory import get_tokenizer, load_umg_checkpoint
from model.launch import DistContext, cleanup, deepspeed_engine, init_distributed, run_with_ray
from model.losses import LOSS_KEYS, UMGLoss, build_tag_targets, text_ids, total_loss
from model.metrics import MetricsLog, plot_losses, progress_bar
from model.schedule import build_optimizer, build_scheduler
from model.umg_clip import UMGCLIP
from pipeline.shards import shard_tars
from pipeline.storage import as_path, is_local

log = logging.getLogger(__name__)

@dataclass
class TrainResult:
    """What a finished (or time-sliced) run left behind."""

    checkpoint: Path
    steps: int
    metrics_csv: Path
    final_losses: dict[str, float]

    def summary(self) -> dict:
        """JSON-able form (what a Ray worker sends back)."""
        return {"checkpoint": str(self.checkpoint), "steps": self.steps, "metrics_csv": str(self.metrics_csv),
                "final_losses": self.final_losses}

    @classmethod
    def from_summary(cls, done: dict) -> TrainResult:
        return cls(checkpoint=Path(done["checkpoint"]), steps=int(done["steps"]),
                   metrics_csv=Path(done["metrics_csv"]), final_losses=dict(done["final_losses"]))


def train(cfg: TrainConfig, shards: Path | str | Sequence[Path | str], out_dir: Path | str, *,
          prepare_model: Callable[[UMGCLIP], UMGCLIP] | None = None) -> TrainResult:
    """Train UMG-CLIP on shard build dirs / tars; resumes from ``out_dir`` per ``cfg.resume``.

    Single process, torchrun (``RANK``/``WORLD_SIZE`` env) or, with ``distributed.launcher: ray``,
    Ray Train workers. Every rank returns the same ``TrainResult``. ``prepare_model`` (see
    :class:`Trainer`) is for torchrun / single-process runs.
    """
    tars = resolve_tars(shards)
    out_dir = Path(out_dir)
    if cfg.distributed.launcher == "ray":
        if prepare_model is not None:
            raise ValueError("prepare_model is not passed to Ray Train workers; use the torchrun launcher")
        return TrainResult.from_summary(run_with_ray(cfg, tars, out_dir, train_rank))
    return _train_here(cfg, tars, out_dir, prepare_model)


def _train_here(cfg: TrainConfig, tars: list[Path], out_dir: Path,
                prepare_model: Callable[[UMGCLIP], UMGCLIP] | None = None) -> TrainResult:
    ctx = init_distributed(cfg.distributed, cfg.device, need_group=cfg.deepspeed.enabled)
    try:
        return Trainer(cfg, tars, out_dir, ctx, prepare_model=prepare_model).fit()
    finally:
        cleanup(ctx)


def train_rank(cfg: TrainConfig, tars: list[Path], out_dir: Path) -> dict:
    """One rank of a launched run (a Ray Train worker): train here, return the JSON-able summary."""
    return _train_here(cfg, tars, out_dir).summary()


def resolve_tars(shards: Path | str | Sequence[Path | str]) -> list[Path | str]:
    """Build dirs and/or tars (paths, ``s3://`` / ``gs://`` URLs) -> the shard tars, in the given order.

    Local tars come back as ``Path``s, remote ones as URL strings (they travel to DataLoader and Ray workers);
    a webdataset ``pipe:`` command is passed through unchecked.
    """
    items = [shards] if isinstance(shards, (str, Path)) else list(shards)
    piped = {str(item) for item in items if str(item).startswith("pipe:")}
    missing = [str(item) for item in items if str(item) not in piped and not as_path(item).exists()]
    if missing:
        raise FileNotFoundError(f"shards not found: {missing}")
    tars: list[Path | str] = []
    for item in items:
        if str(item) in piped:
            tars.append(str(item))
        else:
            tars.extend(tar if is_local(tar) else str(tar) for tar in shard_tars(item))  # a URL string
    if not tars:
        raise FileNotFoundError(f"no finished shard tars in {[str(i) for i in items]}")
    return tars


def schedule_steps(cfg: TrainConfig, samples: int | None, world_size: int) -> int:
    """Optimizer steps of the schedule: ``steps``, or ``epochs`` over ``samples`` images per epoch."""
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * samples / (cfg.batch_size * world_size * cfg.optim.accum_steps)))


class Trainer:
    """Model, optimizer, schedule, data position and the step; :meth:`fit` runs the loop.

    ``prepare_model`` changes the freshly built model before weights are resumed and the optimizer is
    built, e.g. ``model.convpass.add_convpass`` (adapters in, backbone frozen): only parameters that
    still require grad are optimised.
    """

    def __init__(self, cfg: TrainConfig, tars: Sequence[Path], out_dir: Path, ctx: DistContext,
                 prepare_model: Callable[[UMGCLIP], UMGCLIP] | None = None):
        self.cfg, self.tars, self.out_dir, self.ctx = cfg, list(tars), Path(out_dir), ctx
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        _seed_everything(cfg.seed)
        resume = self._resume_dir()
        self.model = model_from_config(cfg.model, initial_weights=resume is None, device=ctx.device).train()
        if prepare_model is not None:
            self.model = prepare_model(self.model).train()
        if resume is not None:
            load_umg_checkpoint(self.model, resume / WEIGHTS)
        preprocess = self.model.clip.visual.preprocess_cfg
        self.spec = TransformSpec.from_config(cfg.data, preprocess["size"][0], preprocess["mean"], preprocess["std"],
                                              cfg.seed)
        self.tokens = TextTokens(get_tokenizer(cfg.model.name))
        _seed_everything(cfg.seed + ctx.rank)  # same init everywhere, per-rank streams from here (as open_clip)
        self.shared_tags = cfg.loss.tag_vocab == "global" and ctx.world_size > 1
        self.loss_fn = UMGLoss(cfg.loss.lambda_image_tag, cfg.loss.lambda_region_tag, cfg.loss.smooth_l1_beta,
                               duplicate_captions=cfg.loss.duplicate_captions, shared_tag_vocab=self.shared_tags,
                               lambda_image_caption=cfg.loss.lambda_image_caption,
                               lambda_region_caption=cfg.loss.lambda_region_caption,
                               contrastive_chunk=cfg.loss.contrastive_chunk)
        self.data_cfg = cfg.data
        if cfg.steps is None or cfg.data.resampled:  # count the shards' samples once, not every epoch
            samples = cfg.data.samples_per_epoch or count_samples(self.tars)
            self.data_cfg = cfg.data.model_copy(update={"samples_per_epoch": samples})
        self.total_steps = schedule_steps(cfg, self.data_cfg.samples_per_epoch, ctx.world_size)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total_steps)
        self.engine = deepspeed_engine(self.model, self.optimizer, cfg) if cfg.deepspeed.enabled else None
        self.forward_model = self.engine if self.engine is not None else self._ddp_or_plain()
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and ctx.device.type == "cuda")
        self.amp_dtype = torch.bfloat16 if use_bf16 else None
        self.step, self.epoch, self.consumed = 0, 0, {}
        if resume is not None:
            self._restore(resume)

    def _ddp_or_plain(self):
        if self.ctx.world_size == 1:
            return self.model
        ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        return DDP(
            self.model, device_ids=ids, find_unused_parameters=self.cfg.distributed.find_unused_parameters)

    # ---- one optimizer step ------------------------------------------------------------------------------
    def train_step(self, micro_batches: Sequence[RegionBatch]) -> dict[str, float]:
        """Forward/backward every micro-batch, clip, step, schedule; returns the step's metrics.

        Gradients stay in ``.grad`` after the step (zeroed at the start of the next one).
        """
        lrs: dict[str, float] = {}  # the rates this step uses (a tower's top layer under layer decay)
        for group in self.optimizer.param_groups:
            lrs[group.get("tower", "")] = max(lrs.get(group.get("tower", ""), 0.0), group["lr"])
        if self.engine is None:
            self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(len(LOSS_KEYS), device=self.ctx.device)
        for i, batch in enumerate(micro_batches):
            inputs, targets = self._inputs(batch)
            accumulating = isinstance(self.forward_model, DDP) and i < len(micro_batches) - 1
            with self.forward_model.no_sync() if accumulating else nullcontext():
                with self._autocast():
                    out = self.forward_model(**inputs)
                    losses = self.loss_fn(**out, **targets)
                    loss = total_loss(losses)
                if self.engine is not None:
                    self.engine.backward(loss)
                    self.engine.step()
                else:
                    (loss / len(micro_batches)).backward()
            sums += torch.stack([losses[k].detach().float() for k in LOSS_KEYS])
        grad_norm = self._clip_and_step()
        self.model.clamp_logit_scale_()
        values = (sums / len(micro_batches)).tolist()
        metrics = dict(zip(LOSS_KEYS, values), loss=sum(values), grad_norm=grad_norm,
                       logit_scale=float(self.model.logit_scale_exp().detach()))
        metrics.update(lr_visual=lrs.get("visual", math.nan), lr_text=lrs.get("text", math.nan))
        return metrics

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.amp_dtype)

    def _inputs(self, batch: RegionBatch) -> tuple[dict, dict]:
        """Model inputs and tag targets of a micro-batch, on the device, per ``cfg.loss``."""
        if self.cfg.loss.tags and self.shared_tags:
            batch = self._global_tags(batch)
        batch = batch.to(self.ctx.device, non_blocking=True)
        inputs = {"images": batch.images, "caption_tokens": batch.caption_tokens}
        targets = {}
        with_ids = self.cfg.loss.duplicate_captions != "negatives"
        if with_ids:
            targets["caption_ids"] = text_ids(batch.caption_tokens)
        if self.cfg.loss.regions:
            inputs.update(rois=batch.rois, region_caption_tokens=batch.region_caption_tokens)
            if with_ids:
                targets["region_caption_ids"] = text_ids(batch.region_caption_tokens)
        if self.cfg.loss.tags:
            inputs["image_tag_tokens"] = batch.image_tag_tokens
            targets["image_tag_targets"] = batch.image_tag_targets
            if self.cfg.loss.regions:
                inputs["region_tag_tokens"] = batch.region_tag_tokens
                targets["region_tag_targets"] = batch.region_tag_targets
        return inputs, targets

    def _global_tags(self, batch: RegionBatch) -> RegionBatch:
        """Replace the rank's tag vocabularies by those of the global batch (one process would see).

        Targets index the whole vocabulary; the tokens are this rank's contiguous slice of it (rank order), so
        the ranks together encode every tag once and ``UMGLoss(shared_tag_vocab=True)`` gathers the slices.
        """
        gathered: list = [None] * self.ctx.world_size
        dist.all_gather_object(gathered, (batch.image_tags, batch.region_tags))
        out = {}
        for kind, local in (("image", batch.image_tags), ("region", batch.region_tags)):
            lists = [tags for rank_tags in gathered for tags in rank_tags[0 if kind == "image" else 1]]
            offset = sum(len(rank_tags[0 if kind == "image" else 1]) for rank_tags in gathered[: self.ctx.rank])
            vocab, targets = build_tag_targets(lists)
            share = len(vocab) // self.ctx.world_size
            lo = self.ctx.rank * share + min(self.ctx.rank, len(vocab) % self.ctx.world_size)
            hi = lo + share + (self.ctx.rank < len(vocab) % self.ctx.world_size)
            out[f"{kind}_tag_tokens"] = self.tokens.cached(vocab[lo:hi])
            out[f"{kind}_tag_targets"] = targets[offset: offset + len(local)]
        return RegionBatch(**{**vars(batch), **out})

    def _clip_and_step(self) -> float:
        if self.engine is not None:  # the engine stepped at the accumulation boundary and clipped itself
            self.scheduler.step()
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else math.nan
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.optim.grad_clip_norm
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else math.inf)
        self.optimizer.step()
        self.scheduler.step()
        return float(norm)

    # ---- data ---------------------------------------------------------------------------------------------
    def batches(self) -> Iterator[RegionBatch]:
        """Micro-batches across epochs; keeps ``epoch`` and the per-worker data position current."""
        while True:
            dataset = make_dataset(self.tars, self.data_cfg, self.spec, self.tokens, self.cfg.batch_size,
                                   epoch=self.epoch, skip=self.consumed, world_size=self.ctx.world_size)
            loader = make_loader(dataset, self.data_cfg.workers, pin_memory=self.ctx.device.type == "cuda")
            fresh, produced = not self.consumed, False
            for batch in self._agreed(iter(loader)):
                produced = True
                self.consumed[batch.worker] = batch.raw_end
                yield batch
            if fresh and not produced:
                raise RuntimeError(
                    f"epoch {self.epoch} gave no batch on some rank: fewer than batch_size={self.cfg.batch_size} "
                    f"samples per rank, or fewer shards ({len(self.tars)}) than ranks x workers; use data.resampled")
            self.epoch, self.consumed = self.epoch + 1, {}

    def _agreed(self, batches: Iterator[RegionBatch]) -> Iterator[RegionBatch]:
        while True:
            batch = next(batches, None)
            if self.ctx.world_size > 1:
                have = torch.tensor([int(batch is not None)], device=self.ctx.device)
                dist.all_reduce(have, op=dist.ReduceOp.MIN)
                if not have.item():
                    return
            elif batch is None:
                return
            yield batch

    # ---- loop, checkpoints --------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Run until ``total_steps`` (or ``run_steps`` more); checkpoint; plot; return the result."""
        cfg = self.cfg
        stop = self.total_steps if cfg.run_steps is None else min(self.total_steps, self.step + cfg.run_steps)
        metrics_log = MetricsLog(self.out_dir, self.ctx.is_main, self.step, cfg.tensorboard)
        global_batch = cfg.batch_size * self.ctx.world_size * cfg.optim.accum_steps
        batches = self.batches()
        bar = progress_bar(cfg.progress and self.ctx.is_main)
        try:
            with bar:
                task = bar.add_task("train", total=self.total_steps, completed=self.step)
                while self.step < stop:
                    start = time.perf_counter()
                    micro = [next(batches) for _ in range(cfg.optim.accum_steps)]
                    fetched = time.perf_counter()
                    metrics = self.train_step(micro)
                    self.step += 1
                    elapsed = time.perf_counter() - start
                    metrics.update(step=self.step, epoch=self.epoch, data_s=fetched - start, step_s=elapsed,
                                   images_per_s=global_batch / elapsed)
                    metrics_log.write(metrics)
                    bar.update(task, completed=self.step, description=f"train loss {metrics['loss']:.3f}")
                    if self.step % cfg.log_every == 0 and self.ctx.is_main:
                        log.info("step %d/%d loss %.4f (%s) %.1f img/s", self.step, self.total_steps,
                                 metrics["loss"], ", ".join(f"{k} {metrics[k]:.3f}" for k in LOSS_KEYS),
                                 metrics["images_per_s"])
                    if cfg.save_every and self.step % cfg.save_every == 0 and self.step < stop:
                        self.save()
        finally:
            batches.close()
            metrics_log.close()
        checkpoint = self.save() if metrics_log.rows_written else (latest_checkpoint(self.out_dir) or self.save())
        if cfg.plot and self.ctx.is_main:
            plot_losses(metrics_log.path, self.out_dir / "loss_curve.png")
        final = {k: float(v) for k, v in metrics_log.last_row().items() if k == "loss" or k in LOSS_KEYS}
        return TrainResult(checkpoint=checkpoint, steps=self.step, metrics_csv=metrics_log.path, final_losses=final)

    def _gather(self, obj):
        if self.ctx.world_size == 1:
            return [obj]
        out: list = [None] * self.ctx.world_size
        dist.all_gather_object(out, obj)
        return out

    def save(self) -> Path:
        """Checkpoint the current step (all ranks call this)."""
        state = {
            "step": self.step, "epoch": self.epoch, "total_steps": self.total_steps,
            "world_size": self.ctx.world_size, "data": self._gather(dict(self.consumed)),
            "rng": self._gather(rng_state()), "scheduler": self.scheduler.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.engine is None else None,
        }
        return save_checkpoint(self.out_dir, self.step, self.model, self.cfg, state,
                               is_main=self.ctx.is_main, barrier=self.ctx.barrier, engine=self.engine,
                               keep_last=self.cfg.keep_last)

    def _resume_dir(self) -> Path | None:
        if self.cfg.resume == "never":
            return None
        if self.cfg.resume == "auto":
            return latest_checkpoint(self.out_dir)
        return resolve_checkpoint(self.cfg.resume)

    def _restore(self, ckpt: Path) -> None:
        state = load_train_state(ckpt)
        if self.engine is not None:
            self.engine.load_checkpoint(str(ckpt / DEEPSPEED), tag="state", load_optimizer_states=True,
                                        load_lr_scheduler_states=False)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        # The schedule's shape (warmup, total steps) comes from this run's config, its position from the checkpoint.
        self.scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None]})
        factor = self.scheduler.lr_lambdas[0]
        for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base_lr * factor(self.scheduler.last_epoch)
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        rank = self.ctx.rank
        if state["world_size"] == self.ctx.world_size:
            self.consumed = dict(state["data"][rank])
            set_rng_state(state["rng"][rank])
        else:
            log.warning("checkpoint from %d ranks resumed on %d: epoch %d restarts from its beginning",
                        state["world_size"], self.ctx.world_size, self.epoch)
        log.info("resumed from %s at step %d (epoch %d)", ckpt, self.step, self.epoch)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
