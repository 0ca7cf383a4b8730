"""Optimizer step alone: our ``model.lamb.Lamb`` (fused per ``--fused``) vs ``timm.optim.Lamb``, same groups.

Both optimizers step copies of the same model (``--model``, the trainer's parameter groups from
``model.schedule.param_groups``, LAMB settings of ``OptimSection``) on the same fixed random gradients.
Timing: on CPU the process's CPU time (``--threads 1``: robust to other jobs on shared cores), on CUDA
wall time with a synchronize. Rounds of ``--steps`` steps per side, back to back, order alternating; the
first step of each side (state allocation, ours: compiling) is not timed. Last line: the median per-round
ratio timm / ours (> 1: ours is faster).

    .venv/bin/python benchmarks/lamb_step.py [--model umg-tiny-vit] [--steps 20] [--rounds 5] [--fused auto]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="umg-tiny-vit")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fused", default="auto", choices=["auto", "true", "false"])
    parser.add_argument("--visual-ld", type=float, default=1.0, help="layer-wise LR decay (more groups)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from timm.optim import Lamb as TimmLamb

    from data_schemas.train_config import OptimSection
    from model.factory import create_umg_clip
    from model.schedule import build_optimizer, param_groups

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = create_umg_clip(args.model, device=device)
    reference = copy.deepcopy(model)
    optim = OptimSection(lr=1e-4, visual_ld=args.visual_ld, fused=args.fused)
    for p, q in zip(model.parameters(), reference.parameters()):
        p.grad = torch.randn_like(p) * 1e-3
        q.grad = p.grad.clone()
    ours = build_optimizer(model, optim)
    timm = TimmLamb(param_groups(reference, optim), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                    weight_decay=optim.weight_decay, max_grad_norm=None)
    clock = time.perf_counter if device.type == "cuda" else time.process_time

    def timed(opt: torch.optim.Optimizer) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = clock()
        for _ in range(args.steps):
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return clock() - start

    ours.step(), timm.step()  # warm-up: state, compile
    times: dict[str, list[float]] = {"ours": [], "timm": []}
    for i in range(args.rounds):
        for side in (("ours", "timm") if i % 2 == 0 else ("timm", "ours")):
            times[side].append(timed(ours if side == "ours" else timm))
    worst = max(((p - q).abs().max() / q.abs().max().clamp(min=1e-12)).item()
                for p, q in zip(model.parameters(), reference.parameters()))
    ratios = [t / o for o, t in zip(times["ours"], times["timm"])]
    n = sum(p.numel() for p in model.parameters())
    print(f"device {device}, threads {args.threads}, model {args.model} ({n / 1e6:.2f} M parameters in "
          f"{len(ours.param_groups)} groups), optim.fused {args.fused}, {args.steps} steps x {args.rounds} rounds")
    print(f"ours (model.lamb.Lamb): {1e3 * statistics.median(times['ours']) / args.steps:8.2f} ms/step (median round)")
    print(f"timm.optim.Lamb:        {1e3 * statistics.median(times['timm']) / args.steps:8.2f} ms/step (median round)")
    print(f"largest parameter difference after {1 + args.steps * args.rounds} steps: {worst:.2e} of the tensor's max")
    print(f"per-round ratios: {', '.join(f'{r:.3f}' for r in ratios)}")
    print(f"ratio timm / ours (median of {args.rounds} rounds): {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
