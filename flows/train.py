"""Prefect flow ``train``: UMG-CLIP training on a shard build (the work is ``model.trainer.train``).

The flow loads the ``train:`` section of ``config`` (plus ``overrides``), calls the trainer, and adds a
markdown artifact with the final losses and the checkpoint path. ``upstream`` is the build flow run that
triggered it (``flows/serve.py``); it is only logged. Rerunning with the same ``out`` resumes the run.
Its last step emits ``umg.train.completed`` (payload: checkpoint, shards, run dir), which starts the ``adapt``
deployment (``flows/chain.py``).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from data_schemas import TrainConfig, load_config
from flows.chain import TRAIN_COMPLETED, announce
from model.trainer import TrainResult
from model.trainer import train as run_training


def result_markdown(result: TrainResult, shards: str, config: str, upstream: str | None) -> str:
    """The run summary as a markdown table (final losses, checkpoint, metrics file)."""
    rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in sorted(result.final_losses.items()))
    return (f"# UMG-CLIP training\n\nshards `{shards}`, config `{config}`"
            f"{f', after build run `{upstream}`' if upstream else ''}\n\n"
            f"steps: **{result.steps}**  \ncheckpoint: `{result.checkpoint}`  \nmetrics: `{result.metrics_csv}`\n\n"
            f"| loss | final |\n|---|---|\n{rows}\n")


@flow(name="train")
def train(shards: str, config: str = "configs/smoke.yaml", out: str = "out/train",
          overrides: list[str] | None = None, upstream: str | None = None) -> dict:
    """Train on the shard build ``shards`` into the run dir ``out``; returns the result as plain values."""
    logger = get_run_logger()
    if upstream:
        logger.info("triggered by build flow run %s", upstream)
    cfg = load_config(config, overrides, model=TrainConfig, section="train")
    result = run_training(cfg, shards, Path(out))  # shards: a path or URL (s3://…), as the build announced it
    logger.info("trained %d steps; checkpoint %s", result.steps, result.checkpoint)
    create_markdown_artifact(key="umg-train-result", markdown=result_markdown(result, shards, config, upstream),
                             description="UMG-CLIP training: final losses and checkpoint")
    summary = {"checkpoint": str(result.checkpoint), "steps": result.steps, "metrics_csv": str(result.metrics_csv),
               "final_losses": result.final_losses}
    announce(TRAIN_COMPLETED, {"checkpoint": summary["checkpoint"], "shards": shards, "run_dir": str(out),
                               "steps": result.steps}, name=str(out))
    return summary
