"""Annotation noise -> model quality (issue 9 item 4): what the paper's filters buy downstream.

    python experiments/annotation_noise.py --out out/annotation_noise              # ~30 core-minutes
    python experiments/annotation_noise.py --quick --out /tmp/annotation_noise      # a few minutes: it all runs

1. Data: ``make_data`` of experiments/loss_ablation.py (``umg sample --preset P --shards --eval``).
2. (i) ``clean``: train the variant (default ``all_losses`` of configs/ablation.yaml) on the ground-truth shards;
   evaluate it. Its checkpoint, exported with ``umg export-open-clip``, is the CLIP scorer of the caption
   filter (a scorer trained on clean data of this domain; a random tiny CLIP would filter at random), with the
   threshold set to the ``scorer.calibration_quantile`` of its scores of the true captions of the clean
   *val* images.
3. (ii) ``filters_off`` and (iii) ``filters_on``: ``umg build`` of the train images with the ``oracle`` backends
   of ``--noise`` (configs/annotation_noise.yaml: ground truth + box shifts, label flips, misses, spurious and
   duplicate boxes, wrong captions, sloppy masks), once with every filter off (its ``filters_off``
   overrides) and once with the paper's filters on; each build is audited against the ground truth
   (experiments/annotation_audit.py), then the variant is trained on it from the same init (same seed) and
   evaluated with the same functions (region digit top-1, training-free mIoU, zero-shot, retrieval).
4. Report: ``OUT/annotation_noise.json`` (printed last) and ``OUT/annotation_noise.md`` (the tables).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from experiments._cli import parse_experiment_args, run_cli  # noqa: E402
from experiments.ablation_report import COLUMNS  # noqa: E402
from experiments.annotation_audit import audit_build, filter_removals  # noqa: E402
from experiments.loss_ablation import DEFAULT_CONFIG, QUICK, evaluate, load_variants, make_data, train_run  # noqa: E402

DEFAULT_NOISE = ROOT / "configs" / "annotation_noise.yaml"
BUILDS = ("filters_off", "filters_on")
AUDIT_COLUMNS = {  # audit key -> header of the annotation table
    "captions_kept": "captions used", "caption_precision_kept": "caption precision",
    "regions": "regions", "region_precision": "region precision", "region_recall": "region recall",
    "regions_spurious": "spurious", "regions_duplicate": "duplicates",
    "region_caption_precision": "region-caption precision", "masks": "masks", "mask_mean_iou": "mask IoU",
    "tag_precision": "tag precision",
}
RATES = {"caption_precision_kept", "region_precision", "region_recall", "region_caption_precision", "mask_mean_iou",
         "tag_precision"}  # fractions, shown in percent


def load_noise(path: Path) -> dict:
    """The noise config: ``build:`` (oracle chain, filters on), ``filters_off`` overrides, ``scorer`` settings."""
    tree = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(tree.get("build", {}).get("annotate"), dict) or not isinstance(tree.get("filters_off"), list):
        raise ValueError(f"{path}: needs build.annotate (the oracle chain) and a filters_off list of overrides")
    quantile = (tree.get("scorer") or {}).get("calibration_quantile", 0.1)
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"{path}: scorer.calibration_quantile must be in [0, 1), got {quantile}")
    return tree


def make_scorer(checkpoint: str, out: Path) -> dict:
    """Export ``checkpoint`` as open_clip (``umg export-open-clip``) and return the scorer config loading it."""
    from model.export import export_open_clip

    folder = export_open_clip(checkpoint, out)
    return {"backend": "open_clip", "model": f"local-dir:{folder.resolve()}", "device": "cpu", "dtype": "float32",
            "batch_size": 64}


def calibrate(scorer_cfg: dict, raw: Path, split: str, quantile: float) -> dict:
    """Scores of the true captions of ``split``'s images; the threshold is their ``quantile``."""
    from PIL import Image

    import annotators

    instances = json.loads((raw / "annotations" / f"instances_{split}.json").read_text(encoding="utf-8"))
    captions = json.loads((raw / "annotations" / f"captions_{split}.json").read_text(encoding="utf-8"))
    texts: dict[int, list[str]] = {}
    for ann in captions["annotations"]:
        texts.setdefault(ann["image_id"], []).append(ann["caption"])
    scorer = annotators.build("scorer", scorer_cfg)
    scorer.load()
    images = [im for im in instances["images"] if texts.get(im["id"])]
    pictures = [Image.open(raw / "images" / split / im["file_name"]).convert("RGB") for im in images]
    scores = np.concatenate(scorer(pictures, [texts[im["id"]] for im in images]))
    return {"threshold": round(float(np.quantile(scores, quantile)), 4), "quantile": quantile, "split": split,
            "n_scores": int(scores.size), "score_mean": round(float(scores.mean()), 4)}


def umg_build(config: Path, images: Path, out: Path, overrides: list[str]) -> dict:
    """``umg build --source-kind folder`` in a subprocess (the command a user runs); its JSON summary."""
    cmd = [sys.executable, "-m", "flows.cli", "build", "--config", str(config), "--input", str(images),
           "--output", str(out), "--source-kind", "folder", *(f"--set={o}" for o in overrides)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"umg build failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_build_config(noise: dict, raw: Path, scorer: dict, threshold: float, path: Path) -> Path:
    """The noise config's ``build:`` with the ground-truth files and the scorer filled in."""
    from annotators.oracle import fill_truth

    ann = raw / "annotations"
    annotate = fill_truth(noise["build"]["annotate"], (ann / "instances_train.json").resolve(),
                          (raw / "images" / "train").resolve(), (ann / "captions_train.json").resolve())
    annotate = {**annotate, "scorer": scorer, "caption_filter": {"threshold": threshold},
                "tiny_models_dir": str(path.parent / "tiny_models")}
    path.write_text(yaml.safe_dump({"build": {**noise["build"], "annotate": annotate}}, sort_keys=False),
                    encoding="utf-8")
    return path


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    out = Path(args.out)
    noise = load_noise(args.noise)
    overrides = load_variants(args.config).get(args.variant)
    if overrides is None:
        raise ValueError(f"unknown variant {args.variant!r}; {args.config} has {list(load_variants(args.config))}")
    overrides = [*args.extra_overrides, *overrides, f"seed={args.seed}", f"steps={args.steps}"]
    truth_shards, raw, sample = make_data(out / "data", args.preset, args.n, args.data_seed)
    report = {"preset": args.preset, "n": args.n, "data_seed": args.data_seed, "steps": args.steps,
              "seed": args.seed, "variant": args.variant, "train_overrides": overrides,
              "command": " ".join(["python", "experiments/annotation_noise.py", *args.argv]),
              "noise": noise, "runs": {}, "builds": {}}

    def train_and_eval(name: str, shards: Path) -> None:
        record = train_run(args.config, overrides, shards, out / "runs" / name)
        record["metrics"] = evaluate(record["checkpoint"], raw, sample["colors"])
        report["runs"][name] = record
        _write(report, out, start)

    train_and_eval("clean", truth_shards)
    report["builds"]["clean"] = {"audit": audit_build(truth_shards, truth_shards)}
    scorer = make_scorer(report["runs"]["clean"]["checkpoint"], out / "scorer")
    report["scorer"] = {**scorer, **calibrate(scorer, raw, "val", noise.get("scorer", {}).get(
        "calibration_quantile", 0.1))}
    config = write_build_config(noise, raw, scorer, report["scorer"]["threshold"], out / "build_config.yaml")
    for name in BUILDS:
        build_dir = out / "builds" / name
        began = time.perf_counter()
        summary = umg_build(config, raw / "images" / "train", build_dir,
                            noise["filters_off"] if name == "filters_off" else [])
        if summary["errors"]:  # an oracle never fails on its own images: an error row is a bug to look at
            raise RuntimeError(f"umg build {name}: {summary['errors']} error rows (manifest of {build_dir})")
        report["builds"][name] = {"summary": summary, "build_s": round(time.perf_counter() - began, 1),
                                  "audit": audit_build(build_dir, truth_shards)}
        _write(report, out, start)
        train_and_eval(name, build_dir)
    return _write(report, out, start)


def _write(report: dict, out: Path, start: float) -> dict:
    """Write ``annotation_noise.json`` and ``.md`` (partial results survive an interrupted run)."""
    report["wall_s"] = round(time.perf_counter() - start, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "annotation_noise.json").write_text(json.dumps(report, indent=1, sort_keys=True), encoding="utf-8")
    (out / "annotation_noise.md").write_text(markdown(report), encoding="utf-8")
    return report


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def markdown(report: dict) -> str:
    """The annotation-quality table (per build) and the downstream-metrics table (per training run)."""
    names = [n for n in ("clean", *BUILDS) if n in report["builds"]]
    lines = [f"`{report['command']}`", "", "| shards | " + " | ".join(AUDIT_COLUMNS.values()) + " |",
             "|---" * (len(AUDIT_COLUMNS) + 1) + "|"]
    for name in names:
        audit = report["builds"][name]["audit"]
        cells = [_pct(audit.get(k)) if k in RATES else str(audit.get(k, 0)) for k in AUDIT_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if all(name in report["builds"] for name in BUILDS):
        removed = filter_removals(*(report["builds"][name]["audit"] for name in BUILDS))
        lines += ["", "Removed by the filters (filters_off - filters_on): " + ", ".join(
            f"{key.replace('_', ' ')} {value}" for key, value in removed.items())]
    metrics = [k for k in COLUMNS if any(k in r["metrics"] for r in report["runs"].values())]
    lines += ["", "| trained on | " + " | ".join(COLUMNS[k] for k in metrics) + " | train s |",
              "|---" * (len(metrics) + 2) + "|"]
    for name, run in report["runs"].items():
        lines.append(f"| {name} | " + " | ".join(_pct(run["metrics"].get(k)) for k in metrics)
                     + f" | {run['train_s']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output dir: data/, runs/, builds/, report files")
    parser.add_argument("--noise", type=Path, default=DEFAULT_NOISE, help="oracle chain + filters_off YAML")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="train: + ablation.variants YAML")
    parser.add_argument("--variant", default="all_losses", help="the ablation variant trained on every shard set")
    parser.add_argument("--preset", default="learnable", help="sample preset (pipeline/sample_data/presets.py)")
    parser.add_argument("--n", type=int, default=1500, help="images over all splits (0.8 / 0.1 / 0.1)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the generated data")
    parser.add_argument("--seed", type=int, default=0, help="training seed (same init and order for every run)")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    parser.add_argument("--set", dest="extra_overrides", action="append", default=[],
                        help="extra train override for every run (repeatable)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: n={QUICK['n']}, steps={QUICK['steps']}, batch 8")
    return parse_experiment_args(parser, argv, QUICK)


def main(argv: list[str] | None = None) -> int:
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
