"""Training geometry of dense adaptation: FC-CLIP's large-scale jitter, or the eval squash.

FC-CLIP trains on COCO panoptic with detectron2's ``COCOPanopticNewBaselineDatasetMapper`` (Mask2Former's LSJ):
``RandomFlip`` (horizontal), ``ResizeScale(min_scale=0.1, max_scale=2.0, target 1024 x 1024)`` — the image is
scaled by ``min(T·s / H, T·s / W)`` with ``s ~ U(min, max)`` — then ``FixedSizeCrop(1024)``: a random crop
where the image is larger, padding (image value 128, masks 0) to T x T where it is smaller.
:func:`large_scale_jitter` is that, applied to an image tensor and its masks together; the draw
(:class:`JitterDraw`) is separate so the geometry is a pure, testable function.

Without ``scale_range`` (:class:`DenseTrainTransform`) an image goes through the eval transform (squashed
to the model's S x S, ``model.preprocess.eval_transform``) and masks follow by nearest resize — the geometry
of evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms import functional as TF

PAD_VALUE = 128 / 255  # detectron2 FixedSizeCrop's image pad (128 in 0-255 pixels)


@dataclass(frozen=True)
class JitterDraw:
    """One random draw: scale s, crop offset as fractions of the free room (y, x) in [0, 1], horizontal flip."""

    scale: float
    offset_y: float
    offset_x: float
    flip: bool


def large_scale_jitter(image: torch.Tensor, masks: torch.Tensor, size: int, draw: JitterDraw
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """FC-CLIP's training geometry for one image.

    Args:
        image: (3, H, W) float in [0, 1] (not normalised: padding is the grey of detectron2).
        masks: (N, H, W) float {0, 1}.
        size: T, the square output side.
        draw: the random choices (:class:`JitterDraw`).

    Returns:
        image (3, T, T), masks (N, T, T).
    """
    if draw.flip:
        image, masks = image.flip(-1), masks.flip(-1)
    height, width = image.shape[-2:]
    factor = min(size * draw.scale / height, size * draw.scale / width)
    new_h, new_w = max(1, round(height * factor)), max(1, round(width * factor))
    image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)[0]
    masks = F.interpolate(masks[None], size=(new_h, new_w), mode="nearest")[0]
    top, left = round(max(new_h - size, 0) * draw.offset_y), round(max(new_w - size, 0) * draw.offset_x)
    image, masks = image[:, top:top + size, left:left + size], masks[:, top:top + size, left:left + size]
    pad = (0, size - image.shape[-1], 0, size - image.shape[-2])
    return F.pad(image, pad, value=PAD_VALUE), F.pad(masks, pad, value=0.0)


class DenseTrainTransform:
    """(PIL image, (N, H, W) masks) -> normalised (3, T, T) image, (N, T, T) masks.

    Args:
        size: T (the jitter's output side).
        squash: PIL -> normalised (3, S, S), the model's eval transform (used without ``scale_range``).
        mean, std: the model's normalisation.
        scale_range: (min, max) for :func:`large_scale_jitter` (FC-CLIP: (0.1, 2.0)); None = squash to T x T.
        flip: random horizontal flip (FC-CLIP: yes); with jitter only.
        generator: the random source of the draws.
    """

    def __init__(self, size: int, squash, mean, std, scale_range: tuple[float, float] | None = None,
                 flip: bool = True, generator: torch.Generator | None = None):
        self.size, self.squash, self.mean, self.std = size, squash, list(mean), list(std)
        self.scale_range, self.flip = scale_range, flip
        self.generator = generator or torch.Generator().manual_seed(0)

    def draw(self) -> JitterDraw:
        low, high = self.scale_range
        u = torch.rand(4, generator=self.generator).tolist()
        return JitterDraw(scale=low + (high - low) * u[0], offset_y=u[1], offset_x=u[2], flip=self.flip and u[3] < 0.5)

    def __call__(self, image, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = image.convert("RGB")
        if self.scale_range is None:
            pixels = self.squash(image)
            return pixels, F.interpolate(masks[None], size=tuple(pixels.shape[-2:]), mode="nearest")[0]
        pixels, masks = large_scale_jitter(TF.to_tensor(image), masks, self.size, self.draw())
        return TF.normalize(pixels, self.mean, self.std), masks
