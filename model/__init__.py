"""UMG-CLIP model library: towers with token grids, region embeddings, losses, token clustering.

Start with :func:`model.factory.create_umg_clip` and :class:`model.losses.UMGLoss`. Names are
re-exported lazily, so ``import model.losses`` does not import open_clip/timm.
"""

from importlib import import_module

_EXPORTS = {
    "UMGCLIP": "model.umg_clip",
    "TokenClusterCfg": "model.token_cluster",
    "UMGLoss": "model.losses",
    "build_tag_targets": "model.losses",
    "total_loss": "model.losses",
    "boxes_to_rois": "model.regions",
    "crop_boxes": "model.regions",
    "hflip_boxes": "model.regions",
    "pool_region_features": "model.regions",
    "resize_boxes": "model.regions",
    "create_umg_clip": "model.factory",
    "get_tokenizer": "model.factory",
    "list_models": "model.factory",
    "load_umg_checkpoint": "model.factory",
    "save_umg_weights": "model.factory",
    "load_checkpoint": "model.checkpoint",
    "create_model_and_transforms": "model.loading",
    "eval_transform": "model.preprocess",
    "TrainResult": "model.trainer",
    "train": "model.trainer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
