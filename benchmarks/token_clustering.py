"""Token clustering (paper §4.1: 75 % of visual tokens removed) vs none, at 2x the base resolution.

One full trainer step (``model.trainer.Trainer.train_step``: forward, all four UMG losses with regions
and tags, backward, clip, LAMB) of a 12-block ViT (``--width`` 192 = ViT-Ti/16, patch 16) at
``2 x --base`` pixels, once without clustering and once with ``reduction 0.75`` after the default layer
(``TokenClusterCfg.layer``, our default for B/16: 4 of 12 blocks; ``--cluster-layer`` to change it).
Each arm runs in a fresh subprocess:

- peak memory of the step: on CUDA ``torch.cuda.max_memory_allocated`` minus the memory allocated before
  the step; on CPU the process's peak RSS during the step (``VmHWM`` in ``/proc/self/status``, reset via
  ``/proc/self/clear_refs``) minus its RSS before the step, with glibc's mmap threshold pinned at 64 KiB
  (``MALLOC_MMAP_THRESHOLD_``) so freed tensors leave the RSS and the RSS follows live memory. The step
  is measured after a warm-up step, so optimizer state and gradient buffers exist in both arms.
- step time: median of ``--steps`` steps after the warm-up.

Arms alternate for ``--rounds`` rounds; each arm's best round counts. Prints the memory and time
saving, then the ratios last (goal: >= 40 % less memory, >= 30 % faster).

    .venv/bin/python benchmarks/token_clustering.py [--base 224] [--batch 4] [--steps 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peak_memory import ENV, peak_mib  # benchmarks/peak_memory.py (this script's directory)


def _config_json(width: int, layers: int, image_size: int) -> dict:
    return {"embed_dim": 128,
            "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "head_width": 64,
                           "mlp_ratio": 4.0, "patch_size": 16},
            "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}}


def _measure(opts: argparse.Namespace) -> dict:
    """One arm, in this (fresh) process: peak step memory (MiB) and median step time (s)."""
    import gc
    import logging

    import open_clip
    import torch

    from data_schemas import TrainConfig
    from model.data import make_dataset
    from model.launch import DistContext
    from model.trainer import Trainer, resolve_tars

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(opts.threads)
    work = Path(opts.workdir)
    open_clip.add_model_config(work / "configs")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cluster = {"reduction": 0.75, "layer": opts.cluster_layer} if opts.arm == "clustered" else {"reduction": 0.0}
    cfg = TrainConfig.model_validate({
        "model": {"name": "umg-bench-vit", "cluster": cluster}, "batch_size": opts.batch, "steps": 100,
        "data": {"workers": 0, "shuffle": False}, "progress": False, "tensorboard": False, "plot": False})
    trainer = Trainer(cfg, resolve_tars(work / "shards" / "train"), work / f"run-{opts.arm}",
                      DistContext(0, 1, 0, device))
    batch = next(iter(make_dataset(trainer.tars, cfg.data, trainer.spec, trainer.tokens, opts.batch)))
    trainer.train_step([batch])  # warm-up: optimizer state, gradient buffers
    gc.collect()
    step_peak = peak_mib(lambda: trainer.train_step([batch]), device.type)
    times = []
    for _ in range(opts.steps):
        start = time.perf_counter()
        trainer.train_step([batch])
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    grid = batch.images.shape[-1] // 16
    kept = trainer.model.cluster.num_kept(grid * grid) if trainer.model.cluster else None
    return {"peak_mib": step_peak, "step_s": statistics.median(times), "device": str(device),
            "tokens": grid * grid, "kept": kept}


def _run_arm(arm: str, opts: argparse.Namespace, workdir: str) -> dict:
    env = {**os.environ, **ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, __file__, "--arm", arm, "--workdir", workdir, "--batch", str(opts.batch),
           "--steps", str(opts.steps), "--threads", str(opts.threads), "--layers", str(opts.layers),
           "--cluster-layer", str(opts.cluster_layer)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=int, default=224, help="base resolution; the benchmark runs at 2x")
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--cluster-layer", type=int, help="blocks before clustering (default: the config default)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per arm and round (median)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on shared cores)")
    parser.add_argument("--arm", choices=["plain", "clustered"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.cluster_layer is None:
        from data_schemas.train_config import ClusterSection

        opts.cluster_layer = ClusterSection().layer
    if opts.arm:
        print(json.dumps(_measure(opts)))
        return

    from pipeline.sample_shards import write_sample_shards

    with tempfile.TemporaryDirectory() as workdir:
        (Path(workdir) / "configs").mkdir()
        config = _config_json(opts.width, opts.layers, 2 * opts.base)
        (Path(workdir) / "configs" / "umg-bench-vit.json").write_text(json.dumps(config))
        write_sample_shards(Path(workdir) / "shards", n=max(16, opts.batch * 2), seed=0, shard_size=64)
        results = {"plain": [], "clustered": []}
        for _ in range(opts.rounds):
            for arm, runs in results.items():
                runs.append(_run_arm(arm, opts, workdir))
    best = {arm: {"peak_mib": min(r["peak_mib"] for r in runs), "step_s": min(r["step_s"] for r in runs),
                  **{k: runs[0][k] for k in ("device", "tokens", "kept")}} for arm, runs in results.items()}
    plain, clustered = best["plain"], best["clustered"]
    print(f"device {plain['device']}, threads {opts.threads}, ViT width {opts.width} x {opts.layers} blocks, patch 16, "
          f"{2 * opts.base} px ({plain['tokens']} tokens; clustered: {clustered['kept']} after block "
          f"{opts.cluster_layer}), batch {opts.batch}, best of {opts.rounds} rounds")
    for arm, r in best.items():
        print(f"{arm:>9}: peak step memory {r['peak_mib']:8.1f} MiB, step {r['step_s']:.3f} s")
    memory_saving = 1 - clustered["peak_mib"] / plain["peak_mib"]
    speedup = plain["step_s"] / clustered["step_s"]
    print(f"memory saving {memory_saving:.1%} (goal >= 40%), time saving {1 - 1 / speedup:.1%} "
          f"(goal: >= 30% faster)")
    print(f"ratios clustered / plain: memory {clustered['peak_mib'] / plain['peak_mib']:.3f}, "
          f"step time {clustered['step_s'] / plain['step_s']:.3f}")


if __name__ == "__main__":
    main()
