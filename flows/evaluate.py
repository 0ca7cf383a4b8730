"""Prefect flow ``evaluate``: one evaluation task on one checkpoint (the work is ``model.eval``).

``task`` picks the evaluation (``model.eval.tasks.EVAL_TASKS``: zeroshot, retrieval, …) and ``options``
holds its arguments, e.g. ``{"data": "DIR"}`` for zeroshot or ``{"images": "DIR", "captions": "FILE"}``
for retrieval (same names as the library's ``run_*`` keyword arguments). The flow writes ``out`` (JSON)
and its markdown table next to it when given, and adds a markdown artifact and a table artifact with the
result (key ``umg-eval-<task>``). ``upstream`` names the run that produced the checkpoint; it is logged.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from model.eval.report import markdown_table, write_result
from model.eval.tasks import get_task


@flow(name="evaluate")
def evaluate(task: str, checkpoint: str, options: dict[str, Any] | None = None, out: str | None = None,
             upstream: str | None = None) -> dict:
    """Run evaluation ``task`` on ``checkpoint``; returns the result dict (task, dataset, model, metrics)."""
    logger = get_run_logger()
    if upstream:
        logger.info("checkpoint from run %s", upstream)
    run = get_task(task)
    result = run(checkpoint, **(options or {}))
    logger.info("%s on %s: %s", task, result["dataset"], result["metrics"])
    if out:
        write_result(result, out)
    key = f"umg-eval-{task}"
    create_markdown_artifact(key=key, markdown=markdown_table(result), description=f"UMG-CLIP {task} evaluation")
    create_table_artifact(key=f"{key}-metrics", table=[{"metric": k, "value": v} for k, v in result["metrics"].items()],
                          description=f"{task} on {result['dataset']}: {checkpoint}")
    return result
