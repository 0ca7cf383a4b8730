"""Prefect flow ``adapt``: Convpass PET of a trained checkpoint (the work is ``model.adapt_global`` /
``model.dense.train``).

``task="global"`` trains on the shard build ``shards``; ``task="seg"`` trains the FC-CLIP-style dense
model on COCO-format masks under ``data`` (``annotations/panoptic_<split>.json`` + PNGs when present, else
``annotations/instances_<split>.json``; ``images/<split>/``). ``config`` defaults to the smoke schedule
(logged); the paper's dense recipe is ``configs/adapt_fcclip.yaml``.
The flow loads the ``adapt_global:`` / ``adapt_seg:`` section of ``config`` (plus ``overrides``), runs the
adaptation into ``out`` (rerunning resumes a global run) and adds a markdown artifact with the parameter
counts, the final losses and the checkpoint path. Its last step emits ``umg.adapt.completed`` (payload: the
adapted checkpoint, the base checkpoint, the task), which starts the ``evaluate`` deployment (``flows/chain.py``).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from data_schemas import load_config
from flows.chain import ADAPT_COMPLETED, announce


def result_markdown(task: str, summary: dict, checkpoint: str) -> str:
    """The adaptation summary as markdown (parameters, final losses, checkpoint)."""
    rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in sorted(summary["final_losses"].items()))
    share = 100 * summary["trainable_params"] / summary["total_params"]
    return (f"# UMG-CLIP adaptation ({task})\n\nbase `{checkpoint}`  \n"
            f"adapted checkpoint: `{summary['checkpoint']}`  \n"
            f"steps: **{summary['steps']}**  \ntrainable parameters: **{summary['trainable_params']:,}** of "
            f"{summary['total_params']:,} ({share:.2f} %)\n\n| loss | final |\n|---|---|\n{rows}\n")


@flow(name="adapt")
def adapt(task: str, checkpoint: str, out: str = "out/adapt", shards: str | None = None, data: str | None = None,
          split: str = "train", config: str = "configs/adapt_smoke.yaml", overrides: list[str] | None = None,
          upstream: str | None = None) -> dict:
    """Adapt ``checkpoint`` for ``task`` (global | seg) into ``out``; returns the summary as plain values."""
    logger = get_run_logger()
    if upstream:
        logger.info("triggered by flow run %s", upstream)
    logger.info("adapt %s: schedule from config %s", task, config)
    if task == "global":
        from data_schemas.adapt_config import GlobalAdaptConfig
        from model.adapt_global import adapt_global

        if shards is None:
            raise ValueError("task global needs shards")
        cfg = load_config(config, overrides, model=GlobalAdaptConfig, section="adapt_global")
        result = adapt_global(cfg, checkpoint, shards, Path(out))  # shards: a path or URL
    elif task == "seg":
        from data_schemas.adapt_config import SegAdaptConfig
        from model.dense.data import coco_source
        from model.dense.train import adapt_seg

        cfg = load_config(config, overrides, model=SegAdaptConfig, section="adapt_seg")
        result = adapt_seg(cfg, checkpoint, coco_source(Path(data) if data else None, split), Path(out))
    else:
        raise ValueError(f"task must be global or seg, got {task!r}")
    summary = result.summary()
    logger.info("adapted %d steps, %d of %d parameters trainable; checkpoint %s", summary["steps"],
                summary["trainable_params"], summary["total_params"], summary["checkpoint"])
    create_markdown_artifact(key=f"umg-adapt-{task}", markdown=result_markdown(task, summary, checkpoint),
                             description="UMG-CLIP adaptation: parameters, final losses and checkpoint")
    announce(ADAPT_COMPLETED, {"checkpoint": str(summary["checkpoint"]), "base": str(checkpoint), "task": task},
             name=str(out))
    return summary
