"""Training throughput: our trainer step (image-caption loss only) vs open_clip_train's, with the same optimizer.

Both sides train the same open_clip model (our ``UMGCLIP`` wraps it; the open_clip side gets a copy of
the same initial weights) on the same pre-decoded batches, with LAMB (lr 1e-4, betas, eps and weight
decay of our ``optim`` defaults), gradient clipping 1.0, fp32 on CPU / bf16 autocast on CUDA. Three arms:

- ``ours``: ``model.trainer.Trainer.train_step`` with ``loss.regions = loss.tags = false``, ``optim.lamb:
  timm`` and ``optim.fused: false``: its LAMB step is timm's own eager functional ``lamb`` (``model.lamb``),
  the same optimizer code as the open_clip side;
- ``open_clip``: ``open_clip_train.train.train_one_epoch`` (the installed open_clip_torch 3.3.0 wheel) with
  ``open_clip.ClipLoss``, no scaler, no scheduler, logging effectively off, and the optimizer
  ``open_clip_train.main`` builds for ``--opt timm/lamb``: ``timm.optim.create_optimizer_v2(model, "lamb",
  lr, weight_decay, eps, betas)`` (timm's ``Lamb``, timm's no-decay grouping: 1-D parameters and
  ``no_weight_decay()``);
- ``ours compiled``: the same trainer with ``optim.fused: auto`` (``model.lamb``'s ``torch.compile``'d step),
  for the optimizer's own gain, reported separately (ours compiled / ours).

The loss is the same on both sides: ``loss.duplicate_captions = negatives`` (CLIP's labels, what
``ClipLoss`` computes; the default ``mask`` first hashes the captions and masks same-text pairs).

Timing: wall time on CUDA; on CPU the process's CPU time (``time.process_time``), which other jobs on
shared cores do not inflate (``--threads 1``, the default, keeps it equal to the compute). Each round
times the three arms back to back (the order rotates), so a load spike on a shared machine hits all of
them; per-round ratios are the figures, and the medians over ``--rounds`` rounds are printed: the
optimizer's gain (ours compiled / ours), then last the trainer ratio ours / open_clip_train with the same
optimizer (goal >= 1.0), after the images/s of each arm's median round.

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
    parser.add_argument("--rounds", type=int, default=7, help="rounds; the median per-round ratios are printed")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on shared cores)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    import open_clip
    from open_clip_train.train import train_one_epoch
    from timm.optim import create_optimizer_v2

    from data_schemas import TrainConfig
    from model.data import make_dataset
    from model.factory import create_umg_clip
    from model.launch import DistContext
    from model.trainer import Trainer, resolve_tars
    from pipeline.sample_shards import write_sample_shards

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        write_sample_shards(Path(tmp) / "shards", n=max(40, args.batch * 5 // 4 + 8), seed=0, shard_size=64)
        tars = resolve_tars(Path(tmp) / "shards" / "train")

        def trainer(fused: str, run: str) -> Trainer:
            cfg = TrainConfig.model_validate({
                "model": {"name": args.model}, "batch_size": args.batch, "steps": 10**6, "seed": 0,
                "loss": {"regions": False, "tags": False, "duplicate_captions": "negatives"},
                "optim": {"lr": 1e-4, "grad_clip_norm": 1.0, "lamb": "timm", "fused": fused},
                "data": {"workers": 0, "crop": "full"}, "progress": False, "tensorboard": False, "plot": False})
            return Trainer(cfg, tars, Path(tmp) / run, DistContext(0, 1, 0, device))

        ours, compiled = trainer("false", "run"), trainer("auto", "run_compiled")
        batch = next(iter(make_dataset(ours.tars, ours.data_cfg, ours.spec, ours.tokens, args.batch)))
        batches = [batch] * args.steps

        clip = create_umg_clip(args.model, device=device).clip
        clip.load_state_dict(ours.model.clip.state_dict())
        clip.output_dict = True  # as open_clip_train.main creates it
        opt = TrainConfig().optim
        clip_opt = create_optimizer_v2(clip, "lamb", lr=1e-4, weight_decay=opt.weight_decay, eps=opt.eps,
                                       betas=tuple(opt.betas))  # open_clip_train.main, --opt timm/lamb
        data = {"train": _DataInfo(_Batches([(batch.images, batch.caption_tokens)] * args.steps))}
        oc_args = SimpleNamespace(
            device=str(device), precision="amp_bf16" if device.type == "cuda" else "fp32", distill=False,
            accum_freq=1, skip_scheduler=True, horovod=False, grad_clip_norm=1.0, log_every_n_steps=10**9,
            batch_size=args.batch, world_size=1, wandb=False, rank=0, local_rank=0)
        clip_loss = open_clip.ClipLoss()
        clock = _clock(device)

        def timed(step) -> float:
            _sync(device)
            start = clock()
            step()
            _sync(device)
            return clock() - start

        arms = {
            "ours": lambda: [ours.train_step([b]) for b in batches],
            "open_clip": lambda: train_one_epoch(clip, data, clip_loss, 0, clip_opt, None, None, None, oc_args),
            "ours compiled": lambda: [compiled.train_step([b]) for b in batches],
        }
        for step in arms.values():  # warm-up: allocator, optimizer state, kernels, compiled graphs
            step()
        times = {name: [] for name in arms}
        names = list(arms)
        for i in range(args.rounds):
            for name in names[i % 3:] + names[: i % 3]:
                times[name].append(timed(arms[name]))
    images = args.batch * args.steps
    trainer_ratios = [t_oc / t_ours for t_ours, t_oc in zip(times["ours"], times["open_clip"])]
    optimizer_gains = [t_ours / t_comp for t_ours, t_comp in zip(times["ours"], times["ours compiled"])]
    print(f"device {device}, threads {args.threads}, model {args.model}, batch {args.batch}, "
          f"{args.steps} steps x {args.rounds} rounds, timed by {'wall' if device.type == 'cuda' else 'process CPU'} "
          "time; LAMB: timm's eager step on both sides")
    labels = {"ours": "ours (Trainer.train_step, image loss, timm LAMB eager)",
              "open_clip": "open_clip_train.train_one_epoch (--opt timm/lamb)",
              "ours compiled": "ours (Trainer.train_step, model.lamb compiled)"}
    for name, label in labels.items():
        print(f"{label:55s} {images / statistics.median(times[name]):8.1f} images/s (median round)")
    print(f"per-round trainer ratios ours / open_clip: {', '.join(f'{r:.3f}' for r in trainer_ratios)}")
    print(f"per-round optimizer gains compiled / eager: {', '.join(f'{r:.3f}' for r in optimizer_gains)}")
    print(f"optimizer gain, ours compiled LAMB / ours timm LAMB (median of {args.rounds} rounds): "
          f"{statistics.median(optimizer_gains):.3f}")
    print(f"ratio ours / open_clip_train, same optimizer (median of {args.rounds} rounds): "
          f"{statistics.median(trainer_ratios):.3f}")


if __name__ == "__main__":
    main()
