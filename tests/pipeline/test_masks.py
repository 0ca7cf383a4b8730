"""Exact tests for pipeline.masks: RLE round trips and area/box/IoU consistency."""

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from data_schemas import RLE
from pipeline.masks import (
    check_mask_size,
    check_rle,
    decode_mask,
    encode_mask,
    mask_area,
    mask_bbox_xyxy,
    mask_iou,
    rle_string_counts,
)


def _block(height: int, width: int, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[rows, cols] = True
    return mask


def _random_masks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.random((h, w)) < p for h, w, p in [(7, 13, 0.5), (32, 20, 0.1), (1, 1, 1.0), (5, 9, 0.02)]]


def test_encode_gives_str_counts_and_hw_size():
    rle = encode_mask(_block(10, 12, slice(2, 5), slice(3, 7)))
    assert isinstance(rle, RLE)
    assert rle.size == (10, 12)
    assert isinstance(rle.counts, str)


@pytest.mark.parametrize("mask", _random_masks() + [np.zeros((4, 6), bool), np.ones((6, 4), bool)])
def test_round_trip(mask):
    decoded = decode_mask(encode_mask(mask))
    assert decoded.dtype == np.bool_
    np.testing.assert_array_equal(decoded, mask)


def test_decode_accepts_dict_with_str_or_bytes_counts():
    mask = _block(8, 9, slice(1, 4), slice(0, 9))
    rle = encode_mask(mask)
    np.testing.assert_array_equal(decode_mask({"size": [8, 9], "counts": rle.counts}), mask)
    np.testing.assert_array_equal(decode_mask({"size": [8, 9], "counts": rle.counts.encode()}), mask)


def test_non_contiguous_input_is_encoded_correctly():
    mask = _block(6, 10, slice(1, 3), slice(2, 9))[:, ::2]
    np.testing.assert_array_equal(decode_mask(encode_mask(mask)), mask)


def test_hand_computed_area_and_bbox():
    mask = _block(10, 12, slice(2, 5), slice(3, 7))
    rle = encode_mask(mask)
    assert mask_area(rle) == 12
    expected = [3.0, 2.0, 7.0, 5.0]  # x2 = last column (6) + 1, y2 = last row (4) + 1
    np.testing.assert_array_equal(mask_bbox_xyxy(rle), expected)
    np.testing.assert_array_equal(mask_bbox_xyxy(mask), expected)


def test_single_pixel_bbox_has_unit_extent():
    mask = _block(5, 5, slice(4, 5), slice(0, 1))
    np.testing.assert_array_equal(mask_bbox_xyxy(encode_mask(mask)), [0.0, 4.0, 1.0, 5.0])


@pytest.mark.parametrize("mask", _random_masks())
def test_area_and_bbox_from_rle_equal_those_from_array(mask):
    rle = encode_mask(mask)
    assert mask_area(rle) == int(mask.sum())
    np.testing.assert_array_equal(mask_bbox_xyxy(rle), mask_bbox_xyxy(mask))
    np.testing.assert_array_equal(mask_bbox_xyxy(rle.model_dump()), mask_bbox_xyxy(mask))


def test_empty_mask_area_zero_and_bbox_zeros():
    mask = np.zeros((4, 5), dtype=bool)
    rle = encode_mask(mask)
    assert mask_area(rle) == 0
    np.testing.assert_array_equal(mask_bbox_xyxy(rle), np.zeros(4))
    np.testing.assert_array_equal(mask_bbox_xyxy(mask), np.zeros(4))


def test_mask_iou_hand_cases():
    a = np.stack(
        [
            _block(6, 6, slice(0, 2), slice(0, 2)),  # vs 2x3 block containing it: 4 / 6
            _block(6, 6, slice(0, 3), slice(0, 3)),  # identical
            _block(6, 6, slice(0, 2), slice(0, 2)),  # disjoint
            np.zeros((6, 6), bool),  # both empty: convention 0
        ]
    )
    b = np.stack(
        [
            _block(6, 6, slice(0, 2), slice(0, 3)),
            _block(6, 6, slice(0, 3), slice(0, 3)),
            _block(6, 6, slice(4, 6), slice(4, 6)),
            np.zeros((6, 6), bool),
        ]
    )
    iou = mask_iou(a, b)
    assert iou.dtype == np.float64
    np.testing.assert_array_equal(iou, [4 / 6, 1.0, 0.0, 0.0])


def test_mask_iou_empty_batch():
    iou = mask_iou(np.zeros((0, 3, 4), bool), np.zeros((0, 3, 4), bool))
    assert iou.shape == (0,) and iou.dtype == np.float64


def test_mask_iou_rejects_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        mask_iou(np.zeros((1, 3, 4), bool), np.zeros((1, 4, 3), bool))
    with pytest.raises(TypeError, match="bool"):
        mask_iou(np.zeros((1, 3, 4), np.uint8), np.zeros((1, 3, 4), bool))
    with pytest.raises(ValueError, match="dims"):
        mask_iou(np.zeros((3, 4), bool), np.zeros((3, 4), bool))


def test_encode_rejects_non_bool_and_wrong_ndim():
    with pytest.raises(TypeError, match="bool"):
        encode_mask(np.ones((3, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="dims"):
        encode_mask(np.ones((1, 3, 3), dtype=bool))


def test_rle_string_counts_match_pycocotools_runs_and_check_rle_accepts_them():
    rng = np.random.default_rng(3)
    for _ in range(50):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        mask = rng.random((h, w)) < rng.random()
        compressed = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
        flat = mask.flatten(order="F")
        changes = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
        runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
        if flat[0]:
            runs = [0, *runs]  # COCO runs start with background
        assert rle_string_counts(compressed) == runs
        assert check_rle([h, w], compressed) == (h, w)
        assert check_rle([h, w], runs) == (h, w)


def test_check_rle_refuses_what_would_overflow_the_decoder():
    with pytest.raises(ValueError, match="cover 11 pixels"):
        check_rle([2, 5], [5, 6])
    with pytest.raises(ValueError, match="over"):
        check_rle([2**16, 2**16], [2**32 - 1])
    with pytest.raises(ValueError, match="not \\[h, w\\] of ints"):
        check_mask_size([2.0, 5])
