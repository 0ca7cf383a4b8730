"""The one public single-image preprocess for inference, and the box mapping that goes with it.

Every evaluation command uses :func:`eval_transform`: the WHOLE image is resized to S x S (open_clip
``image_transform(..., is_train=False, resize_mode="squash")``: bicubic resize, no crop, RGB, tensor,
normalise), so a box or mask on the original image maps to the network input by a pure per-axis scale
(:func:`scale_boxes_to_input`). S, mean, std and interpolation come from the model's own
``clip.visual.preprocess_cfg`` (for a dense model: that of its ``.umg``). The training loader's
``crop: full`` mode (``model.data``) makes the same picture of a whole image.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from open_clip import image_transform
from PIL import Image
from torch import nn


def input_size(model: nn.Module) -> int:
    """The square input side S of a UMG-CLIP (or of a dense model's ``.umg``); a dense model trained at
    another side (``input_side``, ``umg adapt --set input_size=...``) uses that one."""
    if getattr(model, "input_side", None):
        return int(model.input_side)
    size = preprocess_cfg(model)["size"]
    side = size if isinstance(size, int) else size[0]
    if not isinstance(size, int) and size[0] != size[1]:
        raise ValueError(f"non-square model input {tuple(size)}: evaluation expects S x S")
    return int(side)


def preprocess_cfg(model: nn.Module) -> dict:
    umg = getattr(model, "umg", model)
    return umg.clip.visual.preprocess_cfg


def eval_transform(model: nn.Module, size: int | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image (any mode, any size) -> (3, S, S) float tensor, normalised with the model's mean/std
    (``size``: another side than :func:`input_size`)."""
    cfg = preprocess_cfg(model)
    side = size or input_size(model)
    return image_transform(side, is_train=False, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                           resize_mode="squash", interpolation=cfg.get("interpolation") or "bicubic")


def scale_boxes_to_input(boxes_xyxy: torch.Tensor, orig_hw: tuple[int, int], size: int) -> torch.Tensor:
    """Map xyxy pixel boxes of an (H, W) image onto its S x S :func:`eval_transform` input.

    Args:
        boxes_xyxy: (N, 4) float boxes in original pixels.
        orig_hw: (H, W) of the original image.
        size: S.

    Returns:
        (N, 4) boxes in input pixels: x * S / W, y * S / H (not clipped).
    """
    height, width = orig_hw
    scale = boxes_xyxy.new_tensor([size / width, size / height, size / width, size / height])
    return boxes_xyxy * scale
