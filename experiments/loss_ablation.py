"""Loss ablation on the digit scenes (paper Tab. 7; issue 9): same init, same budget, four loss mixes.

    python experiments/loss_ablation.py --preset learnable --n 1500 --seeds 0 1 2 --steps 600 \
        --adapt-seg --adapt-steps 600 --jobs 2 --out out/ablation           # the main table of the docs
    python experiments/loss_ablation.py --quick --out /tmp/ablation          # ~1 min: checks that it all runs

1. Data: ``umg sample --preset P --n N --seed DATA_SEED --shards --eval`` (the same library calls), once;
   every variant and seed trains on ``OUT/data/train`` and is evaluated on the held-out ``test`` split.
2. Pre-training: for every seed and every variant of ``ablation.variants`` in ``--config``
   (configs/ablation.yaml: image_caption, region_caption, all_losses, tag_only), ``umg train`` with the
   config's ``train:`` section + the variant's overrides + ``seed`` + ``steps``. The seed fixes the random
   init and the data order, so the variants of one seed start from the same weights and see the same batches.
3. Evaluation with the ``umg eval`` library functions (``model.eval.tasks``): zero-shot top-1, retrieval
   I2T / T2I R@1 in the standard protocol and with ``group_identical_texts`` (the digit scenes' templated
   captions repeat across images; docs/evaluation.md), region classification of the ground-truth boxes (digit, and colour via
   ``--attribute umg.color`` when the preset has more than one colour), training-free segmentation mIoU;
   with ``--adapt-seg`` also mIoU after the same short ``umg adapt --task seg`` (configs/adapt_smoke.yaml;
   trains Convpass + the dense head on the train split's instance masks of the same 10 digit classes).
``--jobs N`` runs the (seed, variant) units (train + adapt + eval) in N spawned processes of one thread
each; the report keeps the serial order (seed, then variant) and is rewritten as each run finishes.
4. Report (``experiments/ablation_report.py``): mean ± std over seeds, a markdown table beside the paper's
   Tab. 7, learning curves (PNG) from each run's metrics.csv, JSON; the JSON is printed last.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from experiments._cli import parse_experiment_args, run_cli  # noqa: E402
from experiments.ablation_report import aggregate, write_report  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "ablation.yaml"
QUICK = {"n": 60, "steps": 3, "seeds": [0], "overrides": ["batch_size=8", "optim.warmup_steps=1", "log_every=1"]}
COLOR_TEMPLATE = "a {} digit"  # docs/evaluation.md: the colour probe of the digit scenes

# eval name -> (umg eval task, options from the raw data dir); metric column -> (eval name, result metric key)
EVALS = {
    # preprocess squash: the whole picture (a centre crop can cut off digits); the documented runs used it
    "zeroshot": ("zeroshot", lambda raw: {"data": raw / "classification" / "test", "preprocess": "squash"}),
    "retrieval": ("retrieval", lambda raw: {"images": raw / "images" / "test", "preprocess": "squash",
                                            "captions": raw / "annotations" / "captions_test.json"}),
    "retrieval_grouped": ("retrieval", lambda raw: {"images": raw / "images" / "test", "preprocess": "squash",
                                                    "captions": raw / "annotations" / "captions_test.json",
                                                    "group_identical_texts": True}),
    "region_digit": ("regions", lambda raw: {"images": raw / "images" / "test",
                                             "annotations": raw / "annotations" / "instances_test.json"}),
    "region_color": ("regions", lambda raw: {"images": raw / "images" / "test",
                                             "annotations": raw / "annotations" / "instances_test.json",
                                             "attribute": "umg.color", "templates_file": raw / "color_templates.txt"}),
    "seg": ("seg", lambda raw: {"images": raw / "images" / "test", "masks": raw / "annotations" / "semantic_test",
                                "classes": raw / "annotations" / "classes.txt"}),
}
METRICS = {
    "zeroshot_acc1": ("zeroshot", "acc1"),
    "i2t_r1": ("retrieval", "text_retrieval_recall@1"),
    "t2i_r1": ("retrieval", "image_retrieval_recall@1"),
    "i2t_r1_grouped": ("retrieval_grouped", "text_retrieval_recall@1"),
    "t2i_r1_grouped": ("retrieval_grouped", "image_retrieval_recall@1"),
    "region_digit_acc1": ("region_digit", "acc1"),
    "region_color_acc1": ("region_color", "acc1"),
    "seg_miou": ("seg", "miou"),
}


def load_variants(config: Path) -> dict[str, list[str]]:
    """``ablation.variants`` of ``config``: name -> list of ``key=value`` train overrides."""
    tree = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
    variants = (tree.get("ablation") or {}).get("variants")
    if not isinstance(variants, dict) or not variants:
        raise ValueError(f"{config}: needs an ablation.variants mapping of name -> list of overrides")
    for name, overrides in variants.items():
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
            raise ValueError(f"{config}: ablation.variants.{name} must be a list of key=value strings")
    return variants


def make_data(out: Path, preset: str, n: int, seed: int) -> tuple[Path, Path, dict]:
    """Shards + eval layouts of ``preset`` (what ``umg sample --preset --shards --eval`` writes).

    Returns (train shard dir, raw dir with the eval layouts, sample summary).
    """
    from pipeline.sample_data.eval_formats import write_eval_layouts
    from pipeline.sample_data.presets import preset_config
    from pipeline.sample_shards import write_sample_shards

    config = preset_config(preset)
    summary = write_sample_shards(out, n=n, seed=seed, config=config)
    summary["eval"] = write_eval_layouts(out / "raw")
    (out / "raw" / "color_templates.txt").write_text(COLOR_TEMPLATE + "\n", encoding="utf-8")
    summary["colors"] = len(config.palette)
    return out / "train", out / "raw", summary


def train_run(config: Path, overrides: list[str], shards: Path, out: Path) -> dict:
    """One ``umg train`` run; returns its TrainResult fields and wall time."""
    from data_schemas import TrainConfig, load_config
    from model.trainer import train

    cfg = load_config(config, overrides, model=TrainConfig, section="train")
    start = time.perf_counter()
    result = train(cfg, shards, out)
    return {"checkpoint": str(result.checkpoint), "steps": result.steps, "metrics_csv": str(result.metrics_csv),
            "final_losses": result.final_losses, "train_s": round(time.perf_counter() - start, 1)}


def reused_run(run_dir: Path, steps: int) -> dict | None:
    """The ``train_run`` fields of a finished earlier run in ``run_dir`` (``--reuse-runs``), else None.

    Finished = ``checkpoints/step_{steps:08d}/`` exists; its metrics.csv gives the final losses. Only the
    weights are used (adaptation and evaluation load them), so a run saved by an older trainer whose
    optimizer state no longer resumes still counts.
    """
    import csv

    from model.losses import LOSS_KEYS

    checkpoint, metrics_csv = run_dir / "checkpoints" / f"step_{steps:08d}", run_dir / "metrics.csv"
    if not (checkpoint / "model.safetensors").is_file() or not metrics_csv.is_file():
        return None
    with open(metrics_csv, newline="", encoding="utf-8") as fh:
        last = list(csv.DictReader(fh))[-1]
    if int(last["step"]) != steps:
        return None
    return {"checkpoint": str(checkpoint), "steps": steps, "metrics_csv": str(metrics_csv),
            "final_losses": {k: float(last[k]) for k in ("loss", *LOSS_KEYS)}, "train_s": 0.0, "reused": True}


def adapt_seg_run(checkpoint: str, raw: Path, out: Path, steps: int | None) -> str:
    """The same short dense adaptation for every variant (``umg adapt --task seg`` on the train split)."""
    from data_schemas import load_config
    from data_schemas.adapt_config import SegAdaptConfig
    from flows.cli_adapt import DEFAULT_CONFIG as ADAPT_CONFIG
    from model.dense.data import coco_source
    from model.dense.train import adapt_seg

    cfg = load_config(ADAPT_CONFIG, [f"steps={steps}"] if steps else [], model=SegAdaptConfig, section="adapt_seg")
    return str(adapt_seg(cfg, checkpoint, coco_source(raw, "train", None, None), out).checkpoint)


def evaluate(checkpoint: str, raw: Path, colors: int, adapted: str | None = None) -> dict[str, float]:
    """The metric columns of one checkpoint (fractions). The colour probe needs more than one colour."""
    from model.eval.tasks import get_task

    results = {}
    for name, (task, options) in EVALS.items():
        if name == "region_color" and colors < 2:
            continue
        results[name] = get_task(task)(checkpoint=checkpoint, **options(raw))["metrics"]
    out = {column: results[name][key] for column, (name, key) in METRICS.items() if name in results}
    if adapted is not None:
        out["seg_miou_adapted"] = get_task("seg")(checkpoint=adapted, **EVALS["seg"][1](raw))["metrics"]["miou"]
    return out


def run_one(task: dict) -> dict:
    """Train + (adapt) + evaluate one (seed, variant): the unit a ``--jobs`` worker runs."""
    run_dir = Path(task["run_dir"])
    trained = reused_run(run_dir, task["steps"]) if task["reuse_runs"] else None
    record = {"variant": task["variant"], "seed": task["seed"], "overrides": task["overrides"],
              **(trained or train_run(task["config"], task["overrides"], task["shards"], run_dir))}
    start = time.perf_counter()
    adapted = adapt_seg_run(record["checkpoint"], task["raw"], run_dir / "adapted_seg",
                            task["adapt_steps"]) if task["adapt_seg"] else None
    record["adapt_s"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    record["metrics"] = evaluate(record["checkpoint"], task["raw"], task["colors"], adapted)
    record["eval_s"] = round(time.perf_counter() - start, 1)
    return record


def _worker_init() -> None:
    """Each ``--jobs`` worker computes on one thread (N workers on N cores, no oversubscription)."""
    import torch

    torch.set_num_threads(1)


def run_tasks(tasks: list[dict], jobs: int, on_done) -> list[dict]:
    """Records of ``tasks`` in their (serial) order; ``on_done(records so far, in task order)`` after each.

    ``jobs`` > 1 runs them in that many spawned worker processes; the first failure is raised.
    """
    if jobs <= 1:
        records = []
        for task in tasks:
            records.append(run_one(task))
            on_done(records)
        return records
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    done: dict[int, dict] = {}
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init) as pool:
        pending = {pool.submit(run_one, task): i for i, task in enumerate(tasks)}
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    done[pending.pop(future)] = future.result()  # re-raises a worker's error
                on_done([done[i] for i in sorted(done)])
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # let running runs end, start no more
            raise
    return [done[i] for i in range(len(tasks))]


def run(args: argparse.Namespace) -> dict:
    """The whole experiment; returns the report JSON (also written to ``OUT/loss_ablation.json``)."""
    start = time.perf_counter()
    out = Path(args.out)
    variants = load_variants(args.config)
    if args.variants:
        unknown = sorted(set(args.variants) - set(variants))
        if unknown:
            raise ValueError(f"unknown variants {unknown}; {args.config} has {list(variants)}")
        variants = {k: v for k, v in variants.items() if k in args.variants}
    shards, raw, sample = make_data(out / "data", args.preset, args.n, args.data_seed)
    tasks = [{"variant": name, "seed": seed, "config": args.config, "shards": shards, "raw": raw,
              "overrides": [*args.extra_overrides, *overrides, f"seed={seed}", f"steps={args.steps}"],
              "run_dir": out / "runs" / f"{name}_seed{seed}", "colors": sample["colors"],
              "adapt_seg": args.adapt_seg, "adapt_steps": args.adapt_steps, "steps": args.steps,
              "reuse_runs": args.reuse_runs}
             for seed in args.seeds for name, overrides in variants.items()]
    # partial results survive an interrupted run
    runs = run_tasks(tasks, args.jobs, lambda runs: write_report(_report(args, sample, runs, start), out))
    report = _report(args, sample, runs, start)
    write_report(report, out)
    return report


def _report(args: argparse.Namespace, sample: dict, runs: list[dict], start: float) -> dict:
    return {
        "preset": args.preset, "n": args.n, "data_seed": args.data_seed, "steps": args.steps, "seeds": args.seeds,
        "config": str(args.config), "extra_overrides": args.extra_overrides, "adapt_seg": args.adapt_seg,
        "adapt_steps": args.adapt_steps, "jobs": args.jobs, "reuse_runs": args.reuse_runs,
        "data": {split: sample[split] for split in ("train", "val", "test") if split in sample},
        "command": " ".join(["python", "experiments/loss_ablation.py", *args.argv]),
        "runs": runs, "summary": aggregate(runs), "wall_s": round(time.perf_counter() - start, 1),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output dir: data/, runs/, loss_ablation.{json,md,png}")
    parser.add_argument("--preset", default="learnable", help="sample preset (pipeline/sample_data/presets.py)")
    parser.add_argument("--n", type=int, default=3000, help="images over all splits (0.8 / 0.1 / 0.1)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the generated data (same for all runs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (init + order)")
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps per run (same for every variant)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="train: + ablation.variants YAML")
    parser.add_argument("--variants", nargs="+", help="only these variants of the config (default: all)")
    parser.add_argument("--set", dest="extra_overrides", action="append", default=[],
                        help="extra train override for every run, e.g. --set batch_size=16 (repeatable)")
    parser.add_argument("--adapt-seg", action="store_true", help="also mIoU after umg adapt --task seg")
    parser.add_argument("--adapt-steps", type=int, help="dense adaptation steps (default: configs/adapt_smoke.yaml)")
    parser.add_argument("--reuse-runs", action="store_true",
                        help="skip training where OUT/runs/VARIANT_seedS already holds a checkpoint at --steps "
                             "(re-evaluate / adapt earlier runs; the report marks them reused, train_s 0)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="(seed, variant) runs in parallel worker processes, one thread each (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: n={QUICK['n']}, steps={QUICK['steps']}, one seed, batch 8")
    args = parse_experiment_args(parser, argv, QUICK)
    if args.quick:
        args.adapt_steps = args.adapt_steps or 2
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
