"""Region features from the visual token grid, and box transforms that follow image transforms.

RoI format used throughout the model: an (M, 5) float tensor ``[batch_idx, x1, y1, x2, y2]`` in
*pixel* coordinates of the network input image (x to the right, y down, ``x2``/``y2`` exclusive
edges, so a box covering the whole H x W image is ``[0, 0, W, H]``) — the layout of
``torchvision.ops.roi_align`` and detectron2's ``ROIPooler``.

Pooling: boxes are scaled from pixels to token-grid units per axis, then ``roi_align`` with
``aligned=True`` (a pixel box edge maps to a cell edge; token t sits at the centre of cell t).
With the defaults ``output_size=1, sampling_ratio=-1`` the adaptive sampling puts ceil(box size in
cells) samples per axis, so a box covering whole cells averages exactly the tokens it covers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF
from torchvision.tv_tensors import BoundingBoxFormat

_XYXY = BoundingBoxFormat.XYXY


def boxes_to_rois(boxes_list: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-image (N_i, 4) xyxy boxes -> (sum N_i, 5) rois ``[batch_idx, x1, y1, x2, y2]``."""
    if len(boxes_list) == 0:
        return torch.zeros(0, 5)
    rois = []
    for i, boxes in enumerate(boxes_list):
        if boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"boxes of image {i} must be (N, 4) xyxy, got {tuple(boxes.shape)}")
        idx = torch.full((boxes.shape[0], 1), float(i), dtype=boxes.dtype, device=boxes.device)
        rois.append(torch.cat([idx, boxes], dim=1))
    return torch.cat(rois, dim=0)


def as_rois(boxes: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Accept (M, 5) rois or a per-image list of (N_i, 4) boxes; return (M, 5) rois."""
    if isinstance(boxes, torch.Tensor):
        if boxes.ndim != 2 or boxes.shape[-1] != 5:
            raise ValueError(f"rois must be (M, 5) [batch_idx, x1, y1, x2, y2], got {tuple(boxes.shape)}")
        return boxes
    return boxes_to_rois(boxes)


def pool_region_features(
    token_grid: torch.Tensor,
    rois: torch.Tensor,
    image_size: tuple[int, int],
    output_size: int = 1,
    sampling_ratio: int = -1,
) -> torch.Tensor:
    """RoIAlign on the visual token grid.

    Args:
        token_grid: (B, h, w, D) visual tokens.
        rois: (M, 5) ``[batch_idx, x1, y1, x2, y2]`` in pixels of the (H, W) input image.
        image_size: (H, W) of the input image the boxes refer to.
        output_size: RoIAlign output side; the s x s bins are averaged.
        sampling_ratio: samples per bin and axis; -1 = adaptive (ceil of the bin size in cells).

    Returns:
        (M, D) pooled region features (the token grid's dtype).
    """
    b, h, w = token_grid.shape[:3]
    if rois.numel() and (rois[:, 0].min() < 0 or rois[:, 0].max() >= b):
        raise ValueError(f"roi batch indices must lie in [0, {b}), got {rois[:, 0].unique().tolist()}")
    img_h, img_w = image_size
    # Per-axis (roi_align's spatial_scale is one number; grids need not be square), and x * w / W rather than
    # x * (w / W): the latter is off by an ulp for e.g. 14 * (8 / 112), and adaptive sampling then takes
    # ceil(1 + ε) = 2 samples per cell instead of 1.
    rois = rois.float()
    grid_wh, image_wh = rois.new_tensor([w, h, w, h]), rois.new_tensor([img_w, img_h, img_w, img_h])
    grid_rois = torch.cat([rois[:, :1], rois[:, 1:] * grid_wh / image_wh], dim=1)
    # float32 like torchvision's autocast rule for roi_align: bf16 box coordinates would snap to 1/4 cell.
    feats = token_grid.permute(0, 3, 1, 2).float()  # (B, D, h, w)
    pooled = roi_align(
        feats, grid_rois, output_size=output_size, spatial_scale=1.0,
        sampling_ratio=sampling_ratio, aligned=True,
    )  # (M, D, s, s)
    return pooled.mean(dim=(2, 3)).to(token_grid.dtype)


def _keep_nonempty(boxes: torch.Tensor, min_size: float) -> torch.Tensor:
    return ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)


def clip_boxes(boxes: torch.Tensor, image_size: tuple[int, int], min_size: float = 1.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip (N, 4) xyxy pixel boxes to an (H, W) image.

    Returns:
        (N, 4) clipped boxes and an (N,) bool keep mask, False where a side is shorter than
        ``min_size`` pixels after clipping (the box vanished).
    """
    boxes = TF.clamp_bounding_boxes(boxes, format=_XYXY, canvas_size=tuple(image_size), clamping_mode="hard")
    return boxes, _keep_nonempty(boxes, min_size)


def resize_boxes(boxes: torch.Tensor, old_size: tuple[int, int], new_size: tuple[int, int],
                 min_size: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Follow an image resize from ``old_size`` (H, W) to ``new_size`` (H', W').

    Args:
        boxes: (N, 4) xyxy pixel boxes on the old image.

    Returns:
        (N, 4) boxes on the resized image (clipped) and the (N,) keep mask of :func:`clip_boxes`.
    """
    resized, _ = TF.resize_bounding_boxes(boxes, canvas_size=tuple(old_size), size=list(new_size))
    return clip_boxes(resized, new_size, min_size)


def hflip_boxes(boxes: torch.Tensor, image_size: tuple[int, int], min_size: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Follow a horizontal flip of an (H, W) image: x -> W - x. Returns clipped (N, 4) boxes, (N,) keep."""
    flipped = TF.horizontal_flip_bounding_boxes(boxes, format=_XYXY, canvas_size=tuple(image_size))
    return clip_boxes(flipped, image_size, min_size)


def crop_boxes(boxes: torch.Tensor, top: int, left: int, height: int, width: int, min_size: float = 1.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Follow a crop of the image to rows [top, top + height), columns [left, left + width).

    Returns:
        (N, 4) boxes in the crop's pixel frame, clipped to it, and the (N,) keep mask (False for
        boxes that fall outside the crop or keep less than ``min_size`` pixels on a side).
    """
    shifted = boxes - boxes.new_tensor([left, top, left, top])
    return clip_boxes(shifted, (height, width), min_size)
