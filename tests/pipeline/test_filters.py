"""Exact, hand-computed tests for pipeline.filters."""

import numpy as np
import pytest
import torch

from data_schemas import Caption
from pipeline.filters import (
    Detections,
    apply_caption_scores,
    caption_score_filter,
    clip_boxes_to_image,
    jitter_boxes,
    jitter_stability,
    map_labels,
    mask_stability,
    normalize_label,
    stability_filter,
    threshold_and_merge,
)

BIGDET, V3DET = "vitdet_bigdet", "vitdet_v3det"


def _one(box, score, label, source):
    return Detections.from_detector([box], [score], [label], source)


# ---------------------------------------------------------------- Detections


def test_detections_validates_lengths():
    with pytest.raises(ValueError, match="length"):
        Detections(boxes=torch.zeros(2, 4), scores=torch.zeros(2), labels=["a"], sources=["d", "d"])


def test_detections_converts_and_takes():
    dets = Detections.from_detector(np.array([[0, 0, 1, 1], [2, 2, 3, 3]]), [0.5, 0.6], ["a", "b"], BIGDET)
    assert dets.boxes.dtype == torch.float32 and dets.scores.dtype == torch.float32
    assert dets.sources == [BIGDET, BIGDET]
    picked = dets.take(torch.tensor([False, True]))
    assert picked.labels == ["b"] and picked.boxes.tolist() == [[2.0, 2.0, 3.0, 3.0]]
    assert len(Detections.empty()) == 0 and Detections.empty().boxes.shape == (0, 4)


# ---------------------------------------------------------------- clip_boxes_to_image

CLIP_IN = [[-5, -5, 10, 10], [90, 40, 120, 60], [110, 10, 130, 20], [10, 10, 10, 20]]
CLIP_OUT = [[0, 0, 10, 10], [90, 40, 100, 50], [100, 10, 100, 20], [10, 10, 10, 20]]


def test_clip_boxes_numpy():
    clipped, valid = clip_boxes_to_image(np.array(CLIP_IN, dtype=np.float64), width=100, height=50)
    assert isinstance(clipped, np.ndarray) and clipped.dtype == np.float64
    np.testing.assert_array_equal(clipped, CLIP_OUT)
    np.testing.assert_array_equal(valid, [True, True, False, False])


def test_clip_boxes_min_size_is_strict():
    boxes = np.array(CLIP_IN, dtype=np.float32)
    _, valid = clip_boxes_to_image(boxes, 100, 50, min_size=10.0)  # first two are exactly 10x10
    np.testing.assert_array_equal(valid, [False, False, False, False])
    _, valid = clip_boxes_to_image(boxes, 100, 50, min_size=9.5)
    np.testing.assert_array_equal(valid, [True, True, False, False])


def test_clip_boxes_tensor_in_tensor_out_and_nan_invalid():
    boxes = torch.tensor(CLIP_IN[:1] + [[float("nan"), 0, 5, 5]], dtype=torch.float32)
    clipped, valid = clip_boxes_to_image(boxes, 100, 50)
    assert isinstance(clipped, torch.Tensor) and isinstance(valid, torch.Tensor)
    assert clipped[0].tolist() == CLIP_OUT[0]
    assert valid.tolist() == [True, False]


def test_clip_boxes_empty():
    clipped, valid = clip_boxes_to_image(np.zeros((0, 4), np.float32), 10, 10)
    assert clipped.shape == (0, 4) and clipped.dtype == np.float32
    assert valid.shape == (0,) and valid.dtype == np.bool_


# ---------------------------------------------------------------- threshold_and_merge
# (0,0,10,10) vs (1,1,11,11): IoU = 81 / 119 = 0.68 > 0.5


def test_same_class_overlap_suppresses_lower_score_and_keeps_survivor_provenance():
    a = _one([0, 0, 10, 10], 0.9, "dog", BIGDET)
    b = _one([1, 1, 11, 11], 0.8, "dog", V3DET)
    merged = threshold_and_merge([a, b])
    assert merged.sources == [BIGDET] and merged.labels == ["dog"]
    assert merged.boxes.tolist() == [[0, 0, 10, 10]] and merged.scores.tolist() == pytest.approx([0.9])

    b_wins = threshold_and_merge([a, _one([1, 1, 11, 11], 0.95, "dog", V3DET)])
    assert b_wins.sources == [V3DET] and b_wins.boxes.tolist() == [[1, 1, 11, 11]]


def test_different_class_overlap_kept_when_class_aware_merged_when_agnostic():
    a = _one([0, 0, 10, 10], 0.9, "dog", BIGDET)
    b = _one([1, 1, 11, 11], 0.8, "cat", V3DET)
    aware = threshold_and_merge([a, b], class_aware=True)
    assert aware.labels == ["dog", "cat"] and aware.sources == [BIGDET, V3DET]
    agnostic = threshold_and_merge([a, b], class_aware=False)
    assert agnostic.labels == ["dog"] and agnostic.sources == [BIGDET]


# Two detectors with different vocabularies (BigDetection-like / V3Det-like) seeing the same two objects.
SYNONYMS = {"automobile": "car", "Motor_Car": "car", "puppy": "dog"}


def _two_vocabularies():
    bigdet = Detections.from_detector([[0, 0, 50, 40], [60, 10, 90, 50]], [0.9, 0.7], ["car", "dog"], BIGDET)
    v3det = Detections.from_detector([[2, 1, 51, 42], [61, 9, 90, 52], [1, 0, 49, 40]], [0.8, 0.75, 0.6],
                                     ["automobile", "puppy", "motor-car"], V3DET)
    return bigdet, v3det


def test_same_object_under_synonyms_survives_once_by_default():
    merged = threshold_and_merge(_two_vocabularies())  # the default: class-agnostic
    assert merged.labels == ["car", "puppy"] and merged.sources == [BIGDET, V3DET]


def test_class_aware_on_raw_strings_keeps_every_synonym():
    # the defect: exact label strings differ, so each synonym survives and fills max_regions
    assert len(threshold_and_merge(_two_vocabularies(), class_aware=True)) == 5


def test_class_aware_with_a_label_map_merges_in_one_vocabulary():
    merged = threshold_and_merge(_two_vocabularies(), class_aware=True, label_map=SYNONYMS)
    assert merged.labels == ["car", "dog"] and merged.sources == [BIGDET, V3DET]
    # a different class overlapping the car is still kept class-aware
    truck = Detections.from_detector([[0, 0, 50, 41]], [0.5], ["Truck"], V3DET)
    merged = threshold_and_merge([*_two_vocabularies(), truck], class_aware=True, label_map=SYNONYMS)
    assert merged.labels == ["car", "dog", "truck"]


def test_map_labels_normalises_case_separators_and_keys():
    assert normalize_label("  Traffic_Light-pole ") == "traffic light pole"
    assert map_labels(["Automobile", "motor car", "Bus"], SYNONYMS) == ["car", "car", "bus"]


def test_score_threshold_boundary_kept():
    dets = Detections.from_detector([[0, 0, 5, 5], [20, 20, 25, 25]], [0.3, 0.2999], ["a", "a"], BIGDET)
    merged = threshold_and_merge([dets], score_threshold=0.3)
    assert merged.boxes.tolist() == [[0, 0, 5, 5]]


def test_iou_exactly_at_threshold_is_not_suppressed():
    a = _one([0, 0, 10, 10], 0.9, "dog", BIGDET)
    b = _one([0, 0, 10, 5], 0.8, "dog", V3DET)  # IoU = 50 / 100
    assert len(threshold_and_merge([a, b], iou_threshold=0.5)) == 2
    assert len(threshold_and_merge([a, b], iou_threshold=0.4999)) == 1


def test_output_sorted_by_score_desc_with_ties_in_input_order():
    a = Detections.from_detector([[0, 0, 5, 5], [50, 50, 55, 55]], [0.4, 0.7], ["a", "b"], BIGDET)
    b = Detections.from_detector([[100, 0, 105, 5], [0, 100, 5, 105]], [0.9, 0.7], ["c", "d"], V3DET)
    merged = threshold_and_merge([a, b])
    assert merged.labels == ["c", "b", "d", "a"]
    assert merged.sources == [V3DET, BIGDET, V3DET, BIGDET]
    assert torch.equal(merged.scores, torch.tensor([0.9, 0.7, 0.7, 0.4]))


def test_equal_score_overlap_earlier_detector_wins():
    a = _one([0, 0, 10, 10], 0.5, "dog", BIGDET)
    b = _one([1, 1, 11, 11], 0.5, "dog", V3DET)
    assert threshold_and_merge([a, b]).sources == [BIGDET]
    assert threshold_and_merge([b, a]).sources == [V3DET]


def test_merge_empty_inputs():
    for inputs in ([], [Detections.empty()], [Detections.empty(), _one([0, 0, 1, 1], 0.1, "a", V3DET)]):
        merged = threshold_and_merge(inputs)
        assert len(merged) == 0
        assert merged.boxes.shape == (0, 4) and merged.boxes.dtype == torch.float32
        assert merged.scores.shape == (0,) and merged.labels == [] and merged.sources == []


# ---------------------------------------------------------------- captions


def test_caption_score_filter_boundary():
    kept = caption_score_filter([0.3, 0.2999, 0.5], 0.3)
    assert kept.dtype == np.bool_
    np.testing.assert_array_equal(kept, [True, False, True])
    assert caption_score_filter([], 0.3).shape == (0,)


def test_apply_caption_scores_returns_new_captions():
    captions = [Caption(text="a three", annotator="blip2"), Caption(text="sky", annotator="shikra")]
    scored = apply_caption_scores(captions, np.array([0.31, 0.12]), threshold=0.3)
    assert [(c.text, c.clip_score, c.kept) for c in scored] == [("a three", 0.31, True), ("sky", 0.12, False)]
    assert captions[1].kept is True and captions[1].clip_score is None
    assert apply_caption_scores([], [], 0.3) == []
    with pytest.raises(ValueError, match="2 captions but 1 scores"):
        apply_caption_scores(captions, [0.5], 0.3)


# ---------------------------------------------------------------- jitter_boxes


def test_jitter_boxes_shift_by_fractions_of_the_box_diagonal():
    # a 10 x 20 box: 0.1 of its diagonal along it is (1, 2); 0.5 is (5, 10)
    jittered = jitter_boxes([10, 10, 20, 30], fractions=(0.1, 0.5))
    assert jittered.dtype == np.float32
    np.testing.assert_array_equal(
        jittered, [[11, 12, 21, 32], [9, 8, 19, 28], [15, 20, 25, 40], [5, 0, 15, 20]])


def test_jitter_boxes_scale_with_the_box():
    small, large = jitter_boxes([[10, 10, 14, 14], [0, 0, 400, 400]], fractions=(0.25,))
    np.testing.assert_array_equal(small, [[11, 11, 15, 15], [9, 9, 13, 13]])
    np.testing.assert_array_equal(large, [[100, 100, 500, 500], [-100, -100, 300, 300]])


def test_jitter_boxes_batched_shape_is_box_major():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 7, 9], [1, 2, 3, 4]], np.float32)
    batched = jitter_boxes(boxes, (0.1, 0.2, 0.3))
    assert batched.shape == (3, 6, 4)
    for box, rows in zip(boxes, batched):
        np.testing.assert_array_equal(rows, jitter_boxes(box, (0.1, 0.2, 0.3)))
    assert jitter_boxes(np.zeros((0, 4)), (0.1,), 10, 10).shape == (0, 2, 4)


def test_jitter_boxes_stay_inside_the_image_with_their_size():
    # 0.2 of a 10 x 10 box is (2, 2). At the right edge of an 11 x 40 image: +: x cannot move, y moves 2;
    # -: x has 1 px of room (x1 = 1), y none (y1 = 0)
    jittered = jitter_boxes([1, 0, 11, 10], fractions=(0.2,), width=11, height=40)
    np.testing.assert_array_equal(jittered, [[1, 2, 11, 12], [0, 0, 10, 10]])
    sizes = jittered[:, 2:] - jittered[:, :2]
    np.testing.assert_array_equal(sizes, [[10, 10], [10, 10]])


def test_jitter_boxes_larger_than_the_image_do_not_move_and_are_clipped():
    jittered = jitter_boxes([-5, 2, 30, 8], fractions=(0.1,), width=20, height=10)
    # x sticks out on both sides: no x shift, clipped to [0, 20]; y: +0.6 fits (room 2), -0.6 fits (room 2)
    np.testing.assert_allclose(jittered, [[0, 2.6, 20, 8.6], [0, 1.4, 20, 7.4]], atol=1e-6)


def test_jitter_boxes_rejects_bad_fractions_and_half_size():
    for bad in ((0,), (1.0,), (-0.1,)):
        with pytest.raises(ValueError, match=r"in \(0, 1\)"):
            jitter_boxes([0, 0, 5, 5], fractions=bad)
    with pytest.raises(ValueError, match="both width and height"):
        jitter_boxes([0, 0, 5, 5], fractions=(0.1,), width=10)
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        jitter_boxes([0, 0, 5], fractions=(0.1,))
    assert jitter_boxes([0, 0, 5, 5], fractions=()).shape == (0, 4)


# ---------------------------------------------------------------- mask stability

H, W = 40, 40


def _rect(box, height=H, width=W):
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    mask = np.zeros((height, width), dtype=bool)
    mask[y1:y2, x1:x2] = True
    return mask


class RectSegmenter:
    """Fake SAM: each box becomes its filled rectangle; counts calls and boxes seen."""

    def __init__(self):
        self.calls = 0
        self.boxes_seen = []

    def __call__(self, image, boxes):
        self.calls += 1
        self.boxes_seen.append(np.asarray(boxes))
        return np.stack([_rect(b, *image.shape[:2]) for b in boxes]) if len(boxes) else np.zeros((0, *image.shape[:2]))


IMAGE = np.zeros((H, W, 3), dtype=np.uint8)


def _stability(boxes, fractions, segment=None):
    segment = segment or RectSegmenter()
    masks = np.stack([_rect(b) for b in boxes])
    return mask_stability(IMAGE, np.array(boxes, dtype=np.float32), masks, segment, fractions=fractions)


def test_stability_one_pixel_shift_is_81_over_119():
    stability = _stability([[10, 10, 20, 20]], fractions=(0.1,))
    assert stability.dtype == np.float64
    assert stability.tolist() == [81 / 119]


def test_stability_averages_over_all_shifts():
    # +-1: 9x9 overlap of two 10x10 -> 81/119; +-2: 8x8 -> 64/136
    stability = _stability([[10, 10, 20, 20]], fractions=(0.1, 0.2))
    assert stability[0] == pytest.approx((81 / 119 + 64 / 136) / 2, abs=1e-15)


def test_stability_jitter_stays_inside_the_image():
    # +0.1: (1,1,11,11) -> 81/119; -0.1: no room up-left, the box stays (0,0,10,10) -> 1
    stability = _stability([[0, 0, 10, 10]], fractions=(0.1,))
    assert stability[0] == pytest.approx((81 / 119 + 1) / 2, abs=1e-15)


def test_stability_of_a_box_following_mask_is_the_same_at_every_box_size():
    # A mask that only follows its box scores (1-f)^2 / (2 - (1-f)^2) at any size: with fixed pixel
    # shifts small boxes always failed and large ones always passed.
    stability = _stability([[10, 10, 14, 14], [8, 8, 24, 24], [10, 12, 30, 20]], fractions=(0.25,))
    np.testing.assert_allclose(stability, [0.5625 / 1.4375] * 3, rtol=1e-12)


def test_stability_calls_segment_once_with_all_jittered_boxes_box_major():
    segment = RectSegmenter()
    boxes = [[10, 10, 20, 20], [5, 20, 25, 30]]
    stability = _stability(boxes, fractions=(0.1, 0.2, 0.4), segment=segment)
    assert segment.calls == 1
    seen = segment.boxes_seen[0]
    assert seen.shape == (12, 4)
    np.testing.assert_array_equal(seen[:6], jitter_boxes(boxes[0], (0.1, 0.2, 0.4), W, H))
    np.testing.assert_array_equal(seen[6:], jitter_boxes(boxes[1], (0.1, 0.2, 0.4), W, H))
    assert stability.shape == (2,)
    assert stability[0] == pytest.approx((81 / 119 + 64 / 136 + 36 / 164) / 3, abs=1e-15)


def test_stability_empty_inputs_do_not_call_segment():
    segment = RectSegmenter()
    stability = mask_stability(IMAGE, np.zeros((0, 4), np.float32), np.zeros((0, H, W), bool), segment)
    assert segment.calls == 0
    assert stability.shape == (0,) and stability.dtype == np.float64
    assert stability_filter(stability, 0.5).shape == (0,)


def test_stability_rejects_wrong_segment_output_and_mismatched_inputs():
    def bad_segment(image, boxes):
        return np.zeros((1, H, W), bool)

    masks = _rect([10, 10, 20, 20])[None]
    with pytest.raises(ValueError, match="segment returned"):
        mask_stability(IMAGE, np.array([[10, 10, 20, 20]]), masks, bad_segment, fractions=(0.1,))
    with pytest.raises(ValueError, match=r"masks \(N, H, W\)"):
        mask_stability(IMAGE, np.zeros((2, 4)), masks, RectSegmenter(), fractions=(0.1,))
    with pytest.raises(ValueError, match="at least one"):
        mask_stability(IMAGE, np.array([[10, 10, 20, 20]]), masks, RectSegmenter(), fractions=())


def test_stability_filter_boundary():
    stability = _stability([[10, 10, 20, 20]], fractions=(0.1,))
    keep = stability_filter(stability, 81 / 119)
    assert keep.dtype == np.bool_ and keep.tolist() == [True]
    assert stability_filter(stability, np.nextafter(81 / 119, 1.0)).tolist() == [False]


def test_jitter_stability_is_the_mean_iou_over_jitters():
    masks = np.stack([_rect([10, 10, 20, 20]), np.zeros((H, W), bool)])
    jittered = np.stack([np.stack([_rect([11, 11, 21, 21]), _rect([10, 10, 20, 20])]), np.zeros((2, H, W), bool)])
    np.testing.assert_allclose(jitter_stability(masks, jittered), [(81 / 119 + 1) / 2, 0.0], rtol=1e-15)
    with pytest.raises(ValueError, match=r"\(N, K, H, W\)"):
        jitter_stability(masks, jittered[:1])


def test_default_jitter_fails_a_box_following_mask_by_a_margin():
    from data_schemas import StabilityConfig
    from pipeline.filters import DEFAULT_JITTER_FRACTIONS

    cfg = StabilityConfig()
    assert tuple(cfg.diagonal_fractions) == DEFAULT_JITTER_FRACTIONS
    follow = np.mean([(1 - f) ** 2 / (2 - (1 - f) ** 2) for f in DEFAULT_JITTER_FRACTIONS])
    assert follow < cfg.threshold - 0.1  # the filter separates box-following blobs from objects
