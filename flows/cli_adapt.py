"""``umg adapt``: Convpass PET of a trained checkpoint (thin; the work is ``model.adapt_global`` / ``model.dense``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

TASKS = ("global", "seg")
# The tiny CPU schedules beside the package (a checkout / editable install); without it the built-in defaults.
# Whichever is used is said on stderr and in the result's "config": never silently the smoke schedule.
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "adapt_smoke.yaml"
PAPER_CONFIGS = {"seg": "configs/adapt_fcclip.yaml (FC-CLIP's recipe)",
                 "global": "the built-in defaults of data_schemas/adapt_config.py (LAMB, 5 epochs)"}


def schedule_note(task: str, config: Path | None, chosen_by_default: bool, steps: int | None) -> str:
    """One line saying which schedule ``umg adapt`` runs."""
    source = f"config {config}" if config is not None else "the built-in defaults (data_schemas/adapt_config.py)"
    line = f"umg adapt --task {task}: schedule from {source}"
    if steps is not None:
        line += f", --steps {steps}"
    if chosen_by_default:
        line += (f" — chosen because no --config was given: the tiny smoke schedule for the sample data, "
                 f"not the paper's; for that pass --config {PAPER_CONFIGS[task]}")
    return line


def adapt(
    task: Annotated[str, typer.Option(help="global: image-level PET on shards; seg: FC-CLIP-style dense model")],
    checkpoint: Annotated[str, typer.Option(help="base: UMG-CLIP run/checkpoint dir, model.safetensors, or "
                                                 "an open_clip NAME[:TAG]")],
    out: Annotated[Path, typer.Option(help="adapted checkpoint dir (adapt.json + model.safetensors); resumes")],
    shards: Annotated[Optional[list[Path]], typer.Option("--shards", help="global: shard dir or tar")] = None,
    data: Annotated[Optional[Path], typer.Option(help="seg: COCO root (annotations/panoptic_SPLIT.json + "
                                                      "panoptic_SPLIT/ if present, else instances_SPLIT.json; "
                                                      "images/SPLIT/)")] = None,
    split: Annotated[str, typer.Option(help="seg: split under --data")] = "train",
    annotations: Annotated[Optional[Path], typer.Option(help="seg: COCO instances JSON (instead of --data)")] = None,
    panoptic: Annotated[Optional[Path], typer.Option(help="seg: COCO panoptic JSON (instead of --data)")] = None,
    panoptic_masks: Annotated[Optional[Path], typer.Option(
        "--panoptic-masks", help="seg: folder of the panoptic PNGs (default: the JSON's path without .json)")] = None,
    images: Annotated[Optional[Path], typer.Option(help="seg: image folder (with --annotations / --panoptic)")] = None,
    train_classes: Annotated[Optional[str], typer.Option(
        "--train-classes", help="seg: comma-separated training vocabulary (default: all categories)")] = None,
    config: Annotated[Optional[Path], typer.Option(
        help="YAML with adapt_global: / adapt_seg: sections [default: the project's configs/adapt_smoke.yaml (a "
             "smoke schedule, said on stderr); the paper's dense recipe: configs/adapt_fcclip.yaml]")] = None,
    steps: Annotated[Optional[int], typer.Option(help="optimizer steps (overrides the config)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override, e.g. convpass.dim=16")] = None,
) -> None:
    """Adapt a checkpoint with Convpass (backbone frozen); prints the result (with trainable/total parameters)
    as JSON last. The output dir loads with create_model_and_transforms and every `umg eval` command."""
    from data_schemas import ConfigError, load_config
    from data_schemas.adapt_config import GlobalAdaptConfig, SegAdaptConfig
    from flows.cli import _fail  # here, not at import: flows.cli imports this module

    if task not in TASKS:
        _fail(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    overrides = list(set_ or [])
    chosen_by_default = config is None and DEFAULT_CONFIG.is_file()
    if chosen_by_default:
        config = DEFAULT_CONFIG
    typer.echo(schedule_note(task, config, chosen_by_default, steps), err=True)
    try:
        if task == "global":
            if not shards:
                _fail("--task global needs --shards")
            if steps is not None:
                overrides += [f"train.steps={steps}", "train.epochs=null"]  # --steps replaces an epochs schedule
            cfg = load_config(config, overrides, model=GlobalAdaptConfig, section="adapt_global")
            from model.adapt_global import adapt_global

            result = adapt_global(cfg, checkpoint, shards, out)
        else:
            if steps is not None:
                overrides.append(f"steps={steps}")
            if train_classes is not None:
                names = [c.strip() for c in train_classes.split(",") if c.strip()]
                if not names:
                    _fail("--train-classes is empty")
                overrides.append(f"train_classes={json.dumps(names)}")
            cfg = load_config(config, overrides, model=SegAdaptConfig, section="adapt_seg")
            from model.dense.data import coco_source
            from model.dense.train import adapt_seg

            source = coco_source(data, split, annotations, images, panoptic, panoptic_masks)
            result = adapt_seg(cfg, checkpoint, source, out)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as exc:
        _fail(str(exc))
    if os.environ.get("RANK", "0") == "0":
        typer.echo(json.dumps({**result.summary(), "config": str(config) if config is not None else "built-in"}))
