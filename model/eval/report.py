"""Evaluation results: one dict per run in clip_benchmark's layout, saved as JSON + a markdown table.

A result is ``{"task", "dataset", "model", "metrics": {name: value}, ...extra}`` (clip_benchmark:
``{dataset, model, pretrained, task, metrics}``). Metric values are fractions in [0, 1] (as
clip_benchmark stores them); the markdown table shows them as percentages with one decimal, in the
paper's column order for the task (:data:`TABLE_COLUMNS`; Tab. 2 for zero-shot classification, Tab. 3
for retrieval). Metric keys follow clip_benchmark: ``acc1``, ``acc5``, ``mean_per_class_recall``;
``text_retrieval_recall@k`` = image-to-text (I2T) R@k, ``image_retrieval_recall@k`` = text-to-image
(T2I) R@k. The ``umg eval`` commands print :func:`result_line` as their last line.
"""

from __future__ import annotations

import json
from pathlib import Path

# task -> [(metric key, column header)] in the paper's order; other keys follow in sorted order.
TABLE_COLUMNS: dict[str, list[tuple[str, str]]] = {
    "zeroshot_classification": [("acc1", "top-1"), ("acc5", "top-5"),
                                ("mean_per_class_recall", "mean per-class")],
    "zeroshot_retrieval": [(f"text_retrieval_recall@{k}", f"I2T R@{k}") for k in (1, 5, 10)]
    + [(f"image_retrieval_recall@{k}", f"T2I R@{k}") for k in (1, 5, 10)],
}


def make_result(task: str, dataset: str, model: str, metrics: dict[str, float | None], **extra) -> dict:
    """The result dict; ``extra`` (counts, settings) is kept next to the metrics. An undefined metric (e.g.
    ``acc5`` with fewer than 5 classes, ``model.eval.metrics``) stays None: JSON null, "–" in the table."""
    return {"task": task, "dataset": dataset, "model": model,
            "metrics": {k: None if v is None else float(v) for k, v in metrics.items()}, **extra}


def markdown_table(result: dict) -> str:
    """A one-row markdown table: model, dataset, then the task's metrics in percent."""
    metrics = result["metrics"]
    known = [(k, h) for k, h in TABLE_COLUMNS.get(result["task"], []) if k in metrics]
    columns = known + [(k, k) for k in sorted(set(metrics) - {k for k, _ in known})]
    header = ["model", "dataset", *(h for _, h in columns)]
    row = [f"`{result['model']}`", result["dataset"],
           *("–" if metrics[k] is None else f"{100 * metrics[k]:.1f}" for k, _ in columns)]
    lines = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}", f"| {' | '.join(row)} |"]
    return f"### {result['task']}\n\n" + "\n".join(lines) + "\n\nmetrics in %\n"


def write_result(result: dict, out: str | Path) -> tuple[Path, Path]:
    """Write ``out`` (JSON, indented) and the markdown table next to it (same name, ``.md``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    md = out.with_suffix(".md")
    md.write_text(markdown_table(result), encoding="utf-8")
    return out, md


def result_line(result: dict) -> str:
    """The result as one JSON line (what the commands print last)."""
    return json.dumps(result, sort_keys=True)
