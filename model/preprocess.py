"""The single-image preprocesses for inference, and the box mapping that goes with them.

Two of them (:data:`PREPROCESS`, ``umg eval zeroshot|retrieval --preprocess``):

- ``model``: :func:`clip_transform`, the towers' own open_clip eval transform
  (``open_clip.image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)``: for the open_clip /
  EVA-CLIP configs, resize the shorter side to S and centre-crop S x S), i.e. exactly what
  ``open_clip.create_model_and_transforms`` returns and so what clip_benchmark evaluates with. The default
  of zero-shot classification and retrieval (paper Tab. 2 / 3 protocol).
- ``squash``: :func:`eval_transform`, the WHOLE image resized to S x S (open_clip
  ``image_transform(..., is_train=False, resize_mode="squash")``: bicubic resize, no crop, RGB, tensor,
  normalise), so a box or mask on the original image maps to the network input by a pure per-axis scale
  (:func:`scale_boxes_to_input`). Region, segmentation and dense evaluation always use it (a crop would cut
  boxes and masks); the training loader's ``crop: full`` mode (``model.data``) makes the same picture.

S, mean, std and interpolation come from the model's own ``clip.visual.preprocess_cfg`` (for a dense
model: that of its ``.umg``).
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


def clip_transform(model: nn.Module) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> (3, S, S): the towers' own open_clip eval transform (what clip_benchmark uses; module doc)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**preprocess_cfg(model)), is_train=False)


#: ``--preprocess`` name -> transform factory (module doc).
PREPROCESS: dict[str, Callable[[nn.Module], Callable[[Image.Image], torch.Tensor]]] = {
    "model": clip_transform, "squash": eval_transform}


def image_preprocess(model: nn.Module, name: str) -> Callable[[Image.Image], torch.Tensor]:
    """The :data:`PREPROCESS` transform ``name`` of ``model``."""
    if name not in PREPROCESS:
        raise ValueError(f"unknown preprocess {name!r}; known: {sorted(PREPROCESS)}")
    return PREPROCESS[name](model)


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


def patch_size(model: nn.Module) -> tuple[int, int]:
    """(ph, pw) of a UMG-CLIP's image tower (or of a dense model's ``.umg``)."""
    tokens = getattr(model, "umg", model).tokens
    size = tokens.trunk.patch_embed.patch_size if hasattr(tokens, "trunk") else tokens.visual.patch_size
    return int(size[0]), int(size[1])


def short_side_transform(model: nn.Module, short_side: int, max_side: int, divisor: int
                         ) -> Callable[[Image.Image], tuple[torch.Tensor, tuple[int, int]]]:
    """detectron2's test geometry (``ResizeShortestEdge(short_side, max_side)``, bilinear, aspect kept; the
    normalised image zero-padded bottom/right to a multiple of ``divisor``, as ``ImageList.from_tensors``).

    Returns:
        PIL -> ((3, Hp, Wp) padded tensor, (h, w) of the image inside it).
    """
    from torchvision.transforms import functional as TF

    cfg = preprocess_cfg(model)

    def transform(image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        width, height = image.size
        scale = short_side / min(height, width)
        if max(height, width) * scale > max_side:
            scale = max_side / max(height, width)
        h, w = int(height * scale + 0.5), int(width * scale + 0.5)
        pixels = TF.to_tensor(image.convert("RGB").resize((w, h), Image.BILINEAR))
        pixels = TF.normalize(pixels, list(cfg["mean"]), list(cfg["std"]))
        pad_h, pad_w = (-h) % divisor, (-w) % divisor
        return torch.nn.functional.pad(pixels, (0, pad_w, 0, pad_h)), (h, w)

    return transform
