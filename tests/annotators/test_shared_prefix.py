"""Shared image prefix (``annotators/shared_prefix.py``): the row layout helpers exactly, and on the tiny LLaVA the
``vlm-box`` region captioner and the ``vlm`` image captioner giving the per-job path's greedy captions while each
image goes through the vision tower once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from annotators.region_captioner import VlmBoxCaptioner
from annotators.shared_prefix import common_prefix_length, join_rows, mask_positions


def test_common_prefix_keeps_a_token_per_row():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # identical rows: the last token starts generation
    assert common_prefix_length([[7, 8, 9]]) == 2
    assert common_prefix_length([[1, 2], [3, 4]]) == 0
    assert common_prefix_length([[5], [5, 6]]) == 0
    assert common_prefix_length([]) == 0


def test_join_rows_pads_prefix_and_suffix_apart_and_positions_ignore_pads():
    ids, mask = join_rows([[1, 2, 3], [4]], [[5], [6, 7]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 0, 5], [0, 0, 4, 6, 7]]
    assert mask.tolist() == [[1, 1, 1, 0, 1], [0, 0, 1, 1, 1]]
    positions = mask_positions(torch.tensor(mask))
    assert positions.tolist() == [[0, 1, 2, 0, 3], [0, 0, 0, 1, 2]]  # each row's tokens at their unpadded positions


def _boxes(n: int, width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    wh = rng.uniform(0.1, 0.6, size=(n, 2)) * (width, height)
    xy = rng.uniform(0, 1, size=(n, 2)) * ((width, height) - wh)
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> dict:
    return VlmBoxCaptioner.create_tiny(tmp_path_factory.mktemp("tiny_llava")) | {"device": "cpu"}


def _texts(out) -> list:
    return [[[c.text for c in caps] for caps in per_image] for per_image in out]


def _count_vision_rows(captioner) -> list[int]:
    """Record the batch size of every vision-tower call of ``captioner``'s model."""
    rows: list[int] = []
    tower = captioner.generator.model.model.vision_tower
    tower.register_forward_pre_hook(lambda module, args, kwargs: rows.append(
        (args[0] if args else kwargs["pixel_values"]).shape[0]), with_kwargs=True)
    return rows


@pytest.mark.parametrize("extra", [{}, {"num_beams": 2, "num_return_sequences": 2}], ids=["greedy", "beams"])
def test_vlm_box_shared_prefix_equals_per_job(tiny_llava, images, load, extra):
    boxes = [_boxes(2, *image.size, seed) for seed, image in enumerate(images)]
    cfg = {**tiny_llava, "prompts": "region", "prompts_per_region": 2, "batch_size": 5, **extra}  # batches span images
    per_job = load("region_captioner", cfg, shared_prefix=False)
    shared = load("region_captioner", cfg)  # shared_prefix: true is the default
    assert shared.generator.shares_prefix and not per_job.generator.shares_prefix
    per_job_rows, shared_rows = _count_vision_rows(per_job), _count_vision_rows(shared)
    expected = per_job(images, boxes)
    out = shared(images, boxes)
    assert _texts(out) == _texts(expected)
    assert [[[c.prompt for c in caps] for caps in per_image] for per_image in out] == [
        [[c.prompt for c in caps] for caps in per_image] for per_image in expected]
    assert sum(per_job_rows) == 3 * 2 * 2  # every (box, prompt) job encodes its image
    assert sum(shared_rows) == 3  # each image once


def test_vlm_captioner_shared_prefix_equals_per_job(tiny_llava, images, load):
    cfg = {**tiny_llava, "backend": "vlm", "prompts": "shikra_image", "prompts_per_image": 2, "batch_size": 4}
    per_job, shared = load("captioner", cfg, shared_prefix=False), load("captioner", cfg)
    rows = _count_vision_rows(shared)
    assert [[c.text for c in caps] for caps in shared(images)] == [[c.text for c in caps] for caps in per_job(images)]
    assert sum(rows) == len(images)


def test_shared_prefix_handles_empty_and_single_jobs(tiny_llava, images, load):
    shared = load("region_captioner", tiny_llava)
    assert shared(images, [[], [], []]) == [[], [], []]
    one = [np.zeros((0, 4)), np.zeros((0, 4)), [[5.0, 60.0, 12.0, 70.0]]]
    assert _texts(shared(images, one)) == _texts(load("region_captioner", tiny_llava, shared_prefix=False)(images, one))


@pytest.mark.parametrize("extra", [{"prompts": "blip2_image", "prompts_per_image": 3, "num_beams": 1,
                                    "num_return_sequences": 1}, {"prompts": "blip2_image", "prompts_per_image": 2}],
                         ids=["greedy", "beams"])
def test_blip2_shared_prefix_equals_per_job(blip2_cfg, images, load, extra):
    cfg = {**blip2_cfg, "batch_size": 4, **extra}  # tiny config: 2 beams, 2 sequences each
    per_job, shared = load("captioner", cfg, shared_prefix=False), load("captioner", cfg)
    assert shared.shares_prefix and not per_job.shares_prefix
    rows: list[int] = []
    shared.model.vision_model.register_forward_pre_hook(lambda module, args, kwargs: rows.append(
        (args[0] if args else kwargs["pixel_values"]).shape[0]), with_kwargs=True)
    captions = shared(images)
    assert [[(c.text, c.prompt) for c in caps] for caps in captions] == [
        [(c.text, c.prompt) for c in caps] for caps in per_job(images)]
    assert sum(rows) == len(images)
