"""Registry of evaluation tasks: name -> ``run(checkpoint, **options) -> result dict`` (``model.eval.report``).

Used by the Prefect flow ``evaluate`` (``flows/evaluate.py``), which picks a task by name. Entries are
``"module:function"`` strings, imported on first use. Options are the keyword arguments of the run
function (e.g. zeroshot: ``data``, ``classnames_file``, ``templates_file``, ``batch_size``, ``device``;
regions: ``images``, ``annotations``; seg: ``images``, ``masks``, ``classes``, ``panoptic``).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module

EVAL_TASKS: dict[str, str] = {
    "zeroshot": "model.eval.zeroshot:run_zeroshot",
    "retrieval": "model.eval.retrieval:run_retrieval",
    "regions": "model.eval.region_eval:run_regions",
    "seg": "model.eval.seg_eval:run_seg",
}


def get_task(name: str) -> Callable[..., dict]:
    """The run function of task ``name``.

    Raises:
        ValueError: unknown task (the message lists the known ones).
    """
    if name not in EVAL_TASKS:
        raise ValueError(f"unknown evaluation task {name!r}; known: {sorted(EVAL_TASKS)}")
    module, function = EVAL_TASKS[name].split(":")
    return getattr(import_module(module), function)
