"""The public single-image preprocess: whole image squashed to S x S, boxes follow by a per-axis scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.factory import create_umg_clip
from model.preprocess import eval_transform, input_size, scale_boxes_to_input


@pytest.fixture(scope="module")
def vit():
    return create_umg_clip("umg-tiny-vit")


def test_eval_transform_squashes_the_whole_image_without_crop(vit):
    # A 200 x 100 (W x H) image, left half white, right half black; a grey-scale input is converted to RGB.
    pixels = np.zeros((100, 200), dtype=np.uint8)
    pixels[:, :100] = 255
    out = eval_transform(vit)(Image.fromarray(pixels))
    mean, std = (torch.tensor(vit.clip.visual.preprocess_cfg[k]).view(3, 1, 1) for k in ("mean", "std"))
    raw = out * std + mean
    assert out.shape == (3, 128, 128) and input_size(vit) == 128
    # No crop: the edge sits in the middle column, both halves are kept.
    assert torch.allclose(raw[:, :, :60], torch.ones(3, 128, 60), atol=1e-3)
    assert torch.allclose(raw[:, :, 68:], torch.zeros(3, 128, 60), atol=1e-3)


def test_scale_boxes_to_input_is_a_per_axis_scale():
    boxes = torch.tensor([[0.0, 0.0, 200.0, 100.0], [50.0, 10.0, 100.0, 60.0]])
    out = scale_boxes_to_input(boxes, (100, 200), 128)
    assert torch.allclose(out, torch.tensor([[0.0, 0.0, 128.0, 128.0], [32.0, 12.8, 64.0, 76.8]]))
    assert scale_boxes_to_input(torch.zeros(0, 4), (10, 10), 128).shape == (0, 4)


def test_short_side_transform_is_detectron2s_resize_shortest_edge_plus_padding():
    from PIL import Image

    from model.factory import create_umg_clip
    from model.preprocess import patch_size, short_side_transform

    model = create_umg_clip("umg-tiny-vit")
    assert patch_size(model) == (16, 16)
    transform = short_side_transform(model, 800, 1333, 32)
    pixels, (h, w) = transform(Image.new("RGB", (640, 480), (255, 0, 0)))
    assert (h, w) == (800, 1067) and pixels.shape == (3, 800, 1088)  # 640 * 800 / 480 = 1066.7; padded to /32
    assert pixels[:, :, 1067:].eq(0).all() and not pixels[:, :, :1067].eq(0).all()
    _, (h, w) = transform(Image.new("RGB", (2000, 500)))  # the long side caps: 1333 / 2000
    assert (h, w) == (333, 1333)
