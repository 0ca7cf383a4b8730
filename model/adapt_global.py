"""Global adaptation (``umg adapt --task global``, paper §4.2/§5.1): Convpass PET on shards.

The base model is rebuilt from its checkpoint with clustering off, Convpass goes into every image
block and everything else is frozen (``model.convpass.add_convpass``, passed to the trainer as its
``prepare_model`` hook). The trainer then runs the image-level UMG losses only — image–caption
InfoNCE and the image-tag smooth-L1 term (``loss.regions`` forced off) — with its own LAMB,
warmup + cosine, checkpointing and resume, into ``OUT/train/``. The final weights become the
adapted checkpoint ``OUT/`` (``adapt.json`` + ``model.safetensors``, see ``model.adapted``), which
``create_model_and_transforms`` and every ``umg eval`` command accept.
"""

from __future__ import annotations

import os
from pathlib import Path

from data_schemas.adapt_config import AdaptedCheckpoint, GlobalAdaptConfig
from model.adapted import AdaptResult, base_model, convpass_cfg, parameters_of, resolve_base, save_adapted
from model.checkpoint import WEIGHTS
from model.convpass import add_convpass
from model.factory import load_umg_checkpoint
from model.trainer import train

TRAIN_DIR = "train"


def adapt_global(cfg: GlobalAdaptConfig, base: str | Path, shards, out_dir: str | Path) -> AdaptResult:
    """Train Convpass on ``shards`` from the base checkpoint ``base``; write the adapted dir ``out_dir``.

    Rerunning with the same ``out_dir`` resumes the training run in ``out_dir/train``.
    """
    out_dir = Path(out_dir)
    section, base_config, provenance = resolve_base(base)
    train_cfg = cfg.train.model_copy(update={
        "model": section, "loss": cfg.train.loss.model_copy(update={"regions": False})})
    pet = convpass_cfg(cfg.convpass)
    result = train(train_cfg, shards, out_dir / TRAIN_DIR, prepare_model=lambda umg: add_convpass(umg, pet))
    model = add_convpass(base_model(section, base_config, initial_weights=False), pet)
    load_umg_checkpoint(model, result.checkpoint / WEIGHTS)
    params = parameters_of(model)
    if os.environ.get("RANK", "0") == "0":
        meta = AdaptedCheckpoint(task="global", base_checkpoint=provenance, base_model=section,
                                 open_clip_config=model.open_clip_config, convpass=cfg.convpass,
                                 parameters=params, steps=result.steps)
        save_adapted(out_dir, model, meta)
    return AdaptResult(checkpoint=out_dir, steps=result.steps, trainable_params=params.trainable,
                       total_params=params.total, final_losses=result.final_losses)
