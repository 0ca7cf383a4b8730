"""Export a UMG-CLIP checkpoint's towers as a plain open_clip model folder.

The folder holds ``open_clip_config.json`` (``{"model_cfg", "preprocess_cfg"}``) and
``open_clip_model.safetensors`` (the wrapped open_clip model's state dict), the layout open_clip reads
as ``local-dir:DIR``: ``open_clip.create_model_and_transforms("local-dir:DIR")`` rebuilds the towers
with no UMG-CLIP code, so open_clip and clip_benchmark users (``--model local-dir:DIR``) can evaluate a
checkpoint unchanged and cross-check ``umg eval`` numbers. Token grids, regions and clustering are
UMG-CLIP additions without parameters, so nothing is lost for image/text embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from model.checkpoint import OPEN_CLIP_CONFIG, load_checkpoint

OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"  # the first name open_clip looks for in a local-dir


def export_open_clip(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir/open_clip_config.json`` + ``open_clip_model.safetensors`` for a UMG-CLIP checkpoint.

    Args:
        checkpoint: run dir, checkpoint dir or ``.safetensors`` file in one (``load_checkpoint``).

    Returns:
        ``out_dir``; open it with ``open_clip`` as ``f"local-dir:{out_dir}"``.
    """
    model = load_checkpoint(checkpoint)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.clip.state_dict().items()}
    save_file(state, str(out_dir / OPEN_CLIP_WEIGHTS))
    (out_dir / OPEN_CLIP_CONFIG).write_text(json.dumps(model.open_clip_config, indent=1), encoding="utf-8")
    return out_dir
