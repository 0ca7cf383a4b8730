"""Training data pipeline: batch layout, boxes that follow the image, seeded order, resume skip, sharding."""

from __future__ import annotations

import hashlib
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data_schemas import Caption, ImageRecord, Region, RegionCaption, Tag, TrainConfig
from data_schemas.train_config import DataSection
from model.data import (
    CropBox,
    SampleTransform,
    TextTokens,
    TransformSpec,
    count_samples,
    make_dataset,
    make_loader,
    sample_crop,
    transform_boxes,
)
from model.factory import get_tokenizer
from pipeline.sample_shards import write_sample_shards
from pipeline.shards import shard_tars

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: thread hand-offs cost more than they save on a shared 2-core box
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_sample_shards(out, n=40, seed=0, shard_size=8)  # train: 32 images in 4 shards
    return shard_tars(out / "train")


@pytest.fixture(scope="module")
def tokens():
    return TextTokens(get_tokenizer("umg-tiny-vit"))


def _spec(**kw) -> TransformSpec:
    return TransformSpec(image_size=kw.pop("image_size", 128), mean=MEAN, std=STD, **kw)


def _data(**kw) -> DataSection:
    return DataSection(workers=0, shuffle_buffer=16, shuffle_initial=8, **kw)


def _keys(dataset) -> list[str]:
    return [k for batch in make_loader(dataset, 0) for k in batch.keys]


def test_batch_layout_regions_and_tag_targets(tars, tokens):
    batch = next(iter(make_dataset(tars, _data(shuffle=False), _spec(max_regions=2), tokens, batch_size=8)))
    b, m = len(batch), batch.rois.shape[0]
    assert batch.images.shape == (8, 3, 128, 128) and batch.images.dtype == torch.float32
    assert batch.caption_tokens.shape == (8, 32) and batch.region_caption_tokens.shape == (m, 32)
    assert batch.rois.shape == (m, 5) and len(batch.region_tags) == m
    per_image = torch.bincount(batch.rois[:, 0].long(), minlength=b)
    assert per_image.max() <= 2 and per_image.sum() == m > 8  # the cap bites: sample images have up to 5 digits
    boxes = batch.rois[:, 1:]
    assert (boxes[:, 2:] - boxes[:, :2] >= 4.0).all() and boxes.min() >= 0 and boxes.max() <= 128
    vocab_size = batch.image_tag_tokens.shape[0]
    assert batch.image_tag_targets.shape == (8, vocab_size)
    assert batch.image_tag_targets.sum(1).tolist() == [float(len(tags)) for tags in batch.image_tags]
    assert batch.region_tag_targets.shape == (m, batch.region_tag_tokens.shape[0])
    assert (batch.region_tag_targets.sum(1) >= 1).all()
    assert (batch.epoch, batch.worker, batch.raw_end) == (0, 0, 8)


def _rectangle_sample(box: tuple[int, int, int, int], size=(120, 160), key="rect") -> dict:
    """A black image with one white filled rectangle ``box`` (x1, y1, x2 exclusive edges) and its record."""
    h, w = size
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    x1, y1, x2, y2 = box
    pixels[y1:y2, x1:x2] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=98)
    jpg = buffer.getvalue()
    record = ImageRecord(
        key=key, source="test", source_id=key, width=w, height=h, sha256=hashlib.sha256(jpg).hexdigest(),
        tags=[Tag(name="rect", annotator="t")],
        captions=[Caption(text="a rectangle", annotator="t"), Caption(text="never", annotator="t", kept=False)],
        regions=[Region(id=0, box_xyxy=tuple(map(float, box)), label="rect", annotator="t",
                        captions=[RegionCaption(text="a white rectangle", annotator="t")],
                        tags=[Tag(name="white", annotator="t")])],
    )
    return {"__key__": key, "jpg": jpg, "json": record.model_dump_json().encode()}


def _bright_bbox(image: torch.Tensor) -> torch.Tensor:
    """xyxy (exclusive) bounding box of the pixels brighter than mid-grey in a normalised (3, H, W) image."""
    gray = (image * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]).mean(0)
    ys, xs = torch.nonzero(gray > 0.5, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


@pytest.mark.parametrize("epoch", range(6))
def test_box_still_bounds_the_drawn_rectangle_after_crop_resize_flip(epoch):
    raw = _rectangle_sample((60, 40, 110, 90))
    spec = _spec(image_size=96, crop_scale=(0.5, 1.0), hflip=True, min_box_visible=0.0, seed=3)
    sample = SampleTransform(spec, epoch)(raw)
    assert sample.caption == "a rectangle" and sample.image.shape == (3, 96, 96)
    assert len(sample.boxes) == 1 and sample.region_captions == ["a white rectangle"]
    assert sample.region_tags == [["white"]] and sample.image_tags == ["rect"]
    torch.testing.assert_close(_bright_bbox(sample.image), sample.boxes[0], atol=1.5, rtol=0)


def test_flip_happens_for_some_epochs_and_boxes_mirror():
    raw = _rectangle_sample((10, 40, 50, 90))  # left half of the image
    spec = _spec(image_size=96, crop="full", hflip=True, seed=0)
    centres = {round(float(SampleTransform(spec, e)(raw).boxes[0, [0, 2]].mean())) for e in range(8)}
    assert centres == {18, 78}  # 30 px of 160 -> 18 of 96, mirrored 96 - 18 = 78


def test_box_outside_the_crop_is_dropped_with_its_caption_and_tags():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 70.0, 70.0], [35.0, 35.0, 45.0, 45.0]])
    out, keep = transform_boxes(boxes, CropBox(top=40, left=40, height=40, width=40), 80, False,
                                min_size=1.0, min_visible=0.5)
    assert keep.tolist() == [False, True, False]  # outside; inside; only 25 % visible
    torch.testing.assert_close(out[1], torch.tensor([20.0, 20.0, 60.0, 60.0]))
    raw = _rectangle_sample((0, 0, 12, 12))
    spec = _spec(image_size=64, crop="center", seed=0)  # centre square of the 160 x 120 image starts at x = 20
    sample = SampleTransform(spec)(raw)
    assert sample.boxes.shape == (0, 4) and sample.region_captions == [] and sample.region_tags == []


def test_random_resized_crop_draws_follow_torchvision_bounds():
    rng = random.Random(0)
    spec = _spec(crop_scale=(0.3, 1.0))
    for _ in range(50):
        top, left, h, w = sample_crop(rng, 120, 160, spec)
        assert 0 <= top <= 120 - h and 0 <= left <= 160 - w
        assert 0.3 * 120 * 160 * 0.99 <= h * w <= 120 * 160 and 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05


def test_order_is_deterministic_seeded_and_changes_per_epoch(tars, tokens):
    in_order = _keys(make_dataset(tars, _data(shuffle=False), _spec(), tokens, 4))
    assert in_order == sorted(in_order) and len(in_order) == 32
    first = _keys(make_dataset(tars, _data(), _spec(seed=1), tokens, 4))
    again = _keys(make_dataset(tars, _data(), _spec(seed=1), tokens, 4))
    other_epoch = _keys(make_dataset(tars, _data(), _spec(seed=1), tokens, 4, epoch=1))
    assert first == again != in_order and sorted(first) == in_order
    assert other_epoch != first and sorted(other_epoch) == in_order


def test_captions_are_sampled_per_epoch_from_kept_ones_only(tars, tokens):
    raw = _rectangle_sample((10, 10, 50, 50))
    spec = _spec(seed=0)
    assert {SampleTransform(spec, e)(raw).caption for e in range(20)} == {"a rectangle"}
    batches = [next(iter(make_dataset(tars, _data(shuffle=False), _spec(), tokens, 8, epoch=e))) for e in (0, 0, 1)]
    assert torch.equal(batches[0].caption_tokens, batches[1].caption_tokens)
    assert not torch.equal(batches[0].caption_tokens, batches[2].caption_tokens)


def test_skip_resumes_the_same_stream_mid_epoch(tars, tokens):
    data = _data()
    full = list(make_loader(make_dataset(tars, data, _spec(seed=2), tokens, 4), 0))
    resumed = list(make_loader(make_dataset(tars, data, _spec(seed=2), tokens, 4, skip={0: full[2].raw_end}), 0))
    assert [b.keys for b in resumed] == [b.keys for b in full[3:]]
    assert torch.equal(resumed[0].images, full[3].images)
    assert [b.raw_end for b in resumed] == [b.raw_end for b in full[3:]]


def test_workers_and_ranks_split_shards_disjointly(tars, tokens, monkeypatch):
    data = DataSection(workers=2, shuffle=False)
    batches = list(make_loader(make_dataset(tars, data, _spec(), tokens, 4), 2))
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 32 and {b.worker for b in batches} == {0, 1}
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append(set(_keys(make_dataset(tars, _data(shuffle=False), _spec(), tokens, 4, world_size=2))))
    assert not per_rank[0] & per_rank[1] and len(per_rank[0] | per_rank[1]) == 32


def test_resampled_mode_has_a_fixed_epoch_length(tars, tokens):
    data = _data(resampled=True, samples_per_epoch=24)
    batches = list(make_loader(make_dataset(tars, data, _spec(), tokens, 4), 0))
    assert len(batches) == 6
    again = list(make_loader(make_dataset(tars, data, _spec(), tokens, 4), 0))
    assert [b.keys for b in again] == [b.keys for b in batches]
    assert count_samples(tars) == 32 and TrainConfig(data=data).data.resampled
