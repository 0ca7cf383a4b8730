"""Aggregation and report files of the loss ablation (``experiments/loss_ablation.py``).

``aggregate(runs)`` -> mean ± std per variant and metric; ``write_report(report, out)`` writes
``loss_ablation.json``, ``loss_ablation.md`` (our table beside the paper's Tab. 7) and
``loss_ablation.png`` (learning curves from every run's metrics.csv, mean over seeds).
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

# column key -> header (values are fractions; the table shows percent)
COLUMNS = {
    "zeroshot_acc1": "zero-shot top-1",
    "i2t_r1": "I2T R@1",
    "t2i_r1": "T2I R@1",
    "i2t_r1_grouped": "I2T R@1 (grouped texts)",
    "t2i_r1_grouped": "T2I R@1 (grouped texts)",
    "region_digit_acc1": "region digit top-1 (GT boxes)",
    "region_color_acc1": "region colour top-1 (GT boxes)",
    "seg_miou": "seg mIoU (training-free)",
    "seg_miou_adapted": "seg mIoU (adapted)",
}
# Paper Tab. 7 (UMG-CLIP-B/16, 2.7 M-image subset, 2 epochs; segmentation after dense adaptation on 20 % COCO):
# variant -> (classification, retrieval, segmentation mIoU) in percent. The "+ image tag only" row (71.3 / 73.9
# / 50.4) has no variant here. Tag loss alone: the paper's text says performance "collapses", no numbers.
PAPER_TAB7 = {
    "image_caption": ("71.7", "73.9", "47.7"),
    "region_caption": ("71.3", "73.8", "49.9"),
    "all_losses": ("71.0", "73.9", "50.7"),
    "tag_only": ("collapses", "collapses", "collapses"),
}
LOSS_PANELS = ("loss", "image_caption_loss", "region_caption_loss", "image_tag_loss", "region_tag_loss")


def aggregate(runs: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """``{variant: {metric: {"mean", "std", "n"}}}`` over seeds; std is the sample std (0 for one seed)."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in runs:
        for metric, value in record["metrics"].items():
            values[record["variant"]][metric].append(float(value))
    return {variant: {metric: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                               "n": len(v)} for metric, v in metrics.items()}
            for variant, metrics in values.items()}


def _cell(stat: dict[str, float] | None) -> str:
    if stat is None:
        return "n/a"
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}" if stat["n"] > 1 else f"{100 * stat['mean']:.1f}"


def markdown_table(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    """Our metrics (percent, mean ± std over seeds) and the paper's Tab. 7 per variant."""
    columns = [c for c in COLUMNS if any(c in metrics for metrics in summary.values())]
    header = ["variant", *(COLUMNS[c] for c in columns), "paper cls.", "paper retr.", "paper seg."]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, metrics in summary.items():
        paper = PAPER_TAB7.get(variant, ("–", "–", "–"))
        lines.append("| " + " | ".join([variant, *(_cell(metrics.get(c)) for c in columns), *paper]) + " |")
    return "\n".join(lines)


def _curves(runs: list[dict]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """``{variant: {panel: (steps, mean over seeds)}}`` from each run's metrics.csv."""
    per_step: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for record in runs:
        with open(record["metrics_csv"], newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                for panel in LOSS_PANELS:
                    per_step[record["variant"]][panel][int(row["step"])].append(float(row[panel]))
    return {variant: {panel: (sorted(steps), [statistics.fmean(steps[s]) for s in sorted(steps)])
                      for panel, steps in panels.items()} for variant, panels in per_step.items()}


def plot_curves(runs: list[dict], png: Path) -> None:
    """One panel per loss term, one line per variant (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _curves(runs)
    fig, axes = plt.subplots(1, len(LOSS_PANELS), figsize=(4 * len(LOSS_PANELS), 3.2), squeeze=False)
    for ax, panel in zip(axes[0], LOSS_PANELS):
        for i, (variant, panels) in enumerate(curves.items()):
            steps, values = panels[panel]
            if any(values):  # a term the variant switches off logs 0 throughout
                ax.plot(steps, values, label=variant, linewidth=1, color=f"C{i}")  # one colour per variant
        ax.set_title(panel)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)  # the total-loss panel has every variant
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def write_report(report: dict, out: Path) -> None:
    """``out/loss_ablation.{json,md,png}``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "loss_ablation.json").write_text(json.dumps(report, indent=1, sort_keys=True), encoding="utf-8")
    wall = ", ".join(f"{r['variant']} seed {r['seed']}: {r['train_s']:.0f} s" for r in report["runs"])
    md = [f"# Loss ablation: preset `{report['preset']}`, {report['steps']} steps, seeds {report['seeds']}", "",
          f"Command: `{report['command']}`", "",
          f"Data: {report['n']} digit scenes (data seed {report['data_seed']}), evaluated on the held-out test split.",
          "", markdown_table(report["summary"]), "",
          "Percent; mean ± sample std over seeds (one seed: the value). Paper columns: Tab. 7 (classification = "
          "zero-shot top-1, retrieval, segmentation mIoU after dense adaptation).", "",
          f"Wall time: {report['wall_s']:.0f} s in all; training {wall}.", "",
          "![learning curves](loss_ablation.png)"]
    (out / "loss_ablation.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    plot_curves(report["runs"], out / "loss_ablation.png")
