import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torchvision.transforms.v2 import functional as TF

from model.factory import create_umg_clip
from model.regions import (
    as_rois,
    boxes_to_rois,
    clip_boxes,
    crop_boxes,
    hflip_boxes,
    pool_region_features,
    resize_boxes,
)
from model.umg_clip import UMGCLIP


def test_boxes_to_rois_layout():
    rois = boxes_to_rois([torch.tensor([[1.0, 2, 3, 4]]), torch.zeros(0, 4), torch.tensor([[5.0, 6, 7, 8]] * 2)])
    assert rois.tolist() == [[0, 1, 2, 3, 4], [2, 5, 6, 7, 8], [2, 5, 6, 7, 8]]
    assert as_rois(rois) is rois
    with pytest.raises(ValueError):
        as_rois(torch.zeros(3, 4))


def test_one_cell_box_gives_that_token_exactly():
    torch.manual_seed(0)
    grid = torch.randn(2, 4, 6, 8)  # (B, h, w, D), neighbours all differ; image 64 x 96, patch 16
    rois = torch.tensor([[0, 16.0, 32, 32, 48], [1, 80, 0, 96, 16], [1, 0, 48, 16, 64]])
    pooled = pool_region_features(grid, rois, (64, 96))
    expected = torch.stack([grid[0, 2, 1], grid[1, 0, 5], grid[1, 3, 0]])
    assert torch.equal(pooled, expected)
    # patch 14 at 112 px: 14 * (8 / 112) is not exactly 1 in float32, 14 * 8 / 112 is
    grid = torch.randn(1, 8, 8, 4)
    pooled = pool_region_features(grid, torch.tensor([[0, 14.0, 28, 28, 42], [0, 98, 98, 112, 112]]), (112, 112))
    assert torch.equal(pooled, torch.stack([grid[0, 2, 1], grid[0, 7, 7]]))


def test_whole_cell_box_averages_covered_tokens():
    torch.manual_seed(0)
    grid = torch.randn(1, 4, 4, 3)
    pooled = pool_region_features(grid, torch.tensor([[0, 16.0, 0, 48, 32]]), (64, 64))  # cols 1-2, rows 0-1
    torch.testing.assert_close(pooled[0], grid[0, 0:2, 1:3].reshape(-1, 3).mean(0))
    assert pool_region_features(grid, torch.zeros(0, 5), (64, 64)).shape == (0, 3)
    with pytest.raises(ValueError, match="batch indices"):
        pool_region_features(grid, torch.tensor([[1, 0.0, 0, 16, 16]]), (64, 64))


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_umg_clip("umg-tiny-vit").eval()


def test_model_region_of_one_cell_is_that_tokens_projection(vit):
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        _, grid = vit.encode_image(images)
        region = vit.encode_regions(grid, [torch.tensor([[32.0, 48, 48, 64]]), torch.tensor([[112.0, 0, 128, 16]])],
                                    (128, 128))
        v = vit.clip.visual
        expected = F.normalize(torch.stack([v.ln_post(grid[0, 3, 2]), v.ln_post(grid[1, 0, 7])]) @ v.proj, dim=-1)
    assert torch.equal(region, expected)
    assert vit.encode_regions(grid, torch.zeros(0, 5), (128, 128)).shape == (0, 64)


def test_avg_pool_tower_whole_image_region_equals_image_embedding():
    torch.manual_seed(0)
    vision_cfg = {"image_size": 64, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16, "pool_type": "avg"}
    text_cfg = {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}
    clip = CLIP(embed_dim=32, vision_cfg=vision_cfg, text_cfg=text_cfg)
    model = UMGCLIP(clip).eval()
    with torch.no_grad():
        emb, grid = model.encode_image(torch.randn(2, 3, 64, 64))
        whole = model.encode_regions(grid, torch.tensor([[0, 0.0, 0, 64, 64], [1, 0, 0, 64, 64]]), (64, 64))
    torch.testing.assert_close(whole, emb, rtol=1e-5, atol=1e-6)


def _rectangle_image(h, w, x1, y1, x2, y2):
    img = torch.zeros(1, h, w)
    img[:, y1:y2, x1:x2] = 1.0
    return img


def _bounds(img):
    ys, xs = torch.nonzero(img[0] > 0.5, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def _assert_bounds(box, img, tol=1.0):
    assert torch.allclose(box, torch.tensor(_bounds(img), dtype=box.dtype), atol=tol), (box, _bounds(img))


def test_resize_boxes_follow_the_drawn_rectangle():
    img = _rectangle_image(60, 80, 10, 20, 50, 45)
    box = torch.tensor([[10.0, 20, 50, 45]])
    out = TF.resize(img, [90, 40], interpolation=TF.InterpolationMode.NEAREST)
    new, keep = resize_boxes(box, (60, 80), (90, 40))
    assert keep.tolist() == [True] and new.tolist() == [[5.0, 30.0, 25.0, 67.5]]
    _assert_bounds(new[0], out)
    _tiny, keep = resize_boxes(torch.tensor([[10.0, 20, 11, 21]]), (60, 80), (6, 8))  # shrinks below 1 px
    assert keep.tolist() == [False]


def test_hflip_boxes_follow_the_drawn_rectangle():
    img = _rectangle_image(60, 80, 10, 20, 50, 45)
    flipped, keep = hflip_boxes(torch.tensor([[10.0, 20, 50, 45]]), (60, 80))
    assert flipped.tolist() == [[30.0, 20.0, 70.0, 45.0]] and keep.all()
    _assert_bounds(flipped[0], TF.horizontal_flip(img), tol=0)


def test_crop_boxes_clip_and_drop_vanished_boxes():
    img = _rectangle_image(60, 80, 10, 20, 50, 45)
    boxes = torch.tensor([[10.0, 20, 50, 45], [0, 0, 5, 5]])
    cropped, keep = crop_boxes(boxes, top=30, left=30, height=30, width=50)
    assert keep.tolist() == [True, False]
    assert cropped[0].tolist() == [0.0, 0.0, 20.0, 15.0]
    _assert_bounds(cropped[0], TF.crop(img, 30, 30, 30, 50), tol=0)
    assert TF.crop(_rectangle_image(60, 80, 0, 0, 5, 5), 30, 30, 30, 50).sum() == 0  # the dropped box is gone


def test_clip_boxes():
    boxes, keep = clip_boxes(torch.tensor([[-5.0, -5, 10, 10], [70, 0, 90, 10]]), (20, 70))
    assert boxes.tolist() == [[0, 0, 10, 10], [70, 0, 70, 10]] and keep.tolist() == [True, False]
