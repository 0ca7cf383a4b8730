"""Training throughput: our trainer step (image-caption loss only) vs open_clip_train's training step.

Both sides train the same open_clip model (our ``UMGCLIP`` wraps it; the open_clip side gets a copy of
the same initial weights) on the same pre-decoded batches, with LAMB over the same parameter groups
(same hyper-parameters), gradient clipping 1.0, fp32 on CPU / bf16 autocast on CUDA:

- ours: ``model.trainer.Trainer.train_step`` with ``loss.regions = loss.tags = false`` and the trainer's
  optimizer as configured (``model.lamb.Lamb``, ``optim.fused: auto``; ``--fused false`` for its eager step);
- open_clip: ``open_clip_train.train.train_one_epoch`` (the installed open_clip_torch wheel) with
  ``open_clip.ClipLoss``, no scaler, no scheduler, logging effectively off, and ``timm.optim.Lamb``
  (``max_grad_norm=None``): open_clip_train itself offers only AdamW, so timm's LAMB, what EVA-CLIP-style
  open_clip training would use, stands in for the optimizer the paper's recipe needs.

The loss is the same on both sides: ``loss.duplicate_captions = negatives`` (CLIP's labels, what
``ClipLoss`` computes; the default ``mask`` first hashes the captions and masks same-text pairs).

Timing: wall time on CUDA; on CPU the process's CPU time (``time.process_time``), which other jobs on
shared cores do not inflate (``--threads 1``, the default, keeps it equal to the compute). Each round
times both sides back to back (which goes first alternates), so a load spike on a shared
machine hits both; the per-round ratio ours / open_clip is the figure, and the median over ``--rounds``
rounds is printed last (goal >= 1.0), after the images/s of each side's median round.

    .venv/bin/python benchmarks/trainer_vs_open_clip.py [--model umg-tiny-vit] [--batch 32] [--steps 10]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch


class _Batches(list):
    """What train_one_epoch reads from ``data["train"].dataloader``: an iterable with two counts."""

    @property
    def num_batches(self) -> int:
        return len(self)

    @property
    def num_samples(self) -> int:
        return sum(len(images) for images, _ in self)


class _DataInfo:
    """``open_clip_train.data.DataInfo`` without its module (which needs pandas, not installed here)."""

    def __init__(self, dataloader: _Batches):
        self.dataloader = dataloader

    def set_epoch(self, epoch: int) -> None:
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device: torch.device):
    """Wall time on CUDA; on CPU this process's CPU time (other jobs on shared cores do not count; 1 thread)."""
    return time.perf_counter if device.type == "cuda" else time.process_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="umg-tiny-vit")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="batches per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; the median per-round ratio is printed last")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on shared cores)")
    parser.add_argument("--fused", default="auto", choices=["auto", "true", "false"], help="our optim.fused")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    import open_clip
    from open_clip_train.train import train_one_epoch
    from timm.optim import Lamb

    from data_schemas import TrainConfig
    from model.data import make_dataset
    from model.factory import create_umg_clip
    from model.launch import DistContext
    from model.schedule import param_groups
    from model.trainer import Trainer, resolve_tars
    from pipeline.sample_shards import write_sample_shards

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        write_sample_shards(Path(tmp) / "shards", n=max(40, args.batch * 5 // 4 + 8), seed=0, shard_size=64)
        cfg = TrainConfig.model_validate({
            "model": {"name": args.model}, "batch_size": args.batch, "steps": 10**6, "seed": 0,
            "loss": {"regions": False, "tags": False, "duplicate_captions": "negatives"},
            "optim": {"lr": 1e-4, "grad_clip_norm": 1.0, "fused": args.fused},
            "data": {"workers": 0, "crop": "full"}, "progress": False, "tensorboard": False, "plot": False})
        ours = Trainer(cfg, resolve_tars(Path(tmp) / "shards" / "train"), Path(tmp) / "run",
                       DistContext(0, 1, 0, device))
        batch = next(iter(make_dataset(ours.tars, cfg.data, ours.spec, ours.tokens, args.batch)))
        batches = [batch] * args.steps

        clip = create_umg_clip(args.model, device=device).clip
        clip.load_state_dict(ours.model.clip.state_dict())
        clip.output_dict = True  # as open_clip_train.main creates it
        opt = cfg.optim
        clip_opt = Lamb(param_groups(clip, opt), lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                        weight_decay=opt.weight_decay, max_grad_norm=None)
        data = {"train": _DataInfo(_Batches([(batch.images, batch.caption_tokens)] * args.steps))}
        oc_args = SimpleNamespace(
            device=str(device), precision="amp_bf16" if device.type == "cuda" else "fp32", distill=False,
            accum_freq=1, skip_scheduler=True, horovod=False, grad_clip_norm=1.0, log_every_n_steps=10**9,
            batch_size=args.batch, world_size=1, wandb=False, rank=0, local_rank=0)
        clip_loss = open_clip.ClipLoss()

        clock = _clock(device)

        def run_ours() -> float:
            _sync(device)
            start = clock()
            for b in batches:
                ours.train_step([b])
            _sync(device)
            return clock() - start

        def run_open_clip() -> float:
            _sync(device)
            start = clock()
            train_one_epoch(clip, data, clip_loss, 0, clip_opt, None, None, None, oc_args)
            _sync(device)
            return clock() - start

        run_ours(), run_open_clip()  # warm-up: allocator, optimizer state, kernels
        times = {"ours": [], "open_clip": []}
        for i in range(args.rounds):
            for side in (("ours", "open_clip") if i % 2 == 0 else ("open_clip", "ours")):
                times[side].append(run_ours() if side == "ours" else run_open_clip())
    images = args.batch * args.steps
    ratios = [theirs / ours for ours, theirs in zip(times["ours"], times["open_clip"])]
    print(f"device {device}, threads {args.threads}, model {args.model}, batch {args.batch}, "
          f"{args.steps} steps x {args.rounds} rounds, optim.fused {args.fused}, "
          f"timed by {'wall' if device.type == 'cuda' else 'process CPU'} time")
    print(f"ours (model.trainer.Trainer.train_step, image loss): {images / statistics.median(times['ours']):8.1f} "
          "images/s (median round)")
    print(f"open_clip_train.train.train_one_epoch:               "
          f"{images / statistics.median(times['open_clip']):8.1f} images/s (median round)")
    print(f"per-round ratios: {', '.join(f'{r:.3f}' for r in ratios)}")
    print(f"ratio ours / open_clip_train (median of {args.rounds} rounds): {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
