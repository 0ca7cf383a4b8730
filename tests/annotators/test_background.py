"""Background (stuff) segmenters: Mask2Former with a tiny random model, Mask DINO's missing-dependency path."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import annotators
from annotators import AnnotatorError, MissingDependencyError, StuffSegment
from annotators.background import Mask2FormerBackground, MaskDinoBackground, segments_from_panoptic

LABELS = ["person", "car", "dog", "sky", "grass", "wall"]  # the tiny model's id2label


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory) -> dict:
    return Mask2FormerBackground.create_tiny(tmp_path_factory.mktemp("tiny_m2f"))


@pytest.fixture(scope="module")
def background(tiny_cfg, load):
    return load("background", tiny_cfg)


def check_outputs(outputs, images, allowed_labels) -> None:
    assert len(outputs) == len(images)
    for segments, image in zip(outputs, images, strict=True):
        assert isinstance(segments, list)
        for segment in segments:
            assert isinstance(segment, StuffSegment)
            assert segment.label in allowed_labels
            assert segment.mask.shape == (image.height, image.width) and segment.mask.dtype == np.bool_
            assert segment.mask.any()
            assert isinstance(segment.score, float) and 0.0 <= segment.score <= 1.0
        labels = [s.label for s in segments]
        assert len(labels) == len(set(labels))  # stuff of one class is fused into one segment
        if segments:  # panoptic: segments never overlap
            assert np.stack([s.mask for s in segments]).sum(axis=0).max() == 1


def test_build_and_stuff_ids(background, tiny_cfg):
    assert isinstance(background, Mask2FormerBackground)
    assert (background.kind, background.name) == ("background", "mask2former")
    assert tiny_cfg["model"] in background.version
    assert background.stuff_ids == {3, 4, 5}  # first_stuff_id = 3


def test_outputs_at_each_image_size(background, images):
    check_outputs(background(images), images, {"sky", "grass", "wall"})


def test_only_configured_stuff_classes_are_kept(tiny_cfg, images, load):
    everything = load("background", tiny_cfg, first_stuff_id=0)(images)
    check_outputs(everything, images, set(LABELS))
    seen = sorted({s.label for segments in everything for s in segments})
    assert seen, "the tiny model should produce at least one segment with all thresholds at 0"
    chosen = seen[0]
    only = load("background", tiny_cfg, stuff_classes=[chosen])(images)
    check_outputs(only, images, {chosen})
    assert any(only)
    others = load("background", tiny_cfg, stuff_classes=[label for label in LABELS if label != chosen])(images)
    assert all(s.label != chosen for segments in others for s in segments)
    by_id = load("background", tiny_cfg, stuff_classes=[LABELS.index(chosen)])
    assert by_id.stuff_ids == {LABELS.index(chosen)}


def test_batching_equals_one_by_one(tiny_cfg, make_images, load):
    # Same-size images: the processor pads a batch to its largest image and the Swin backbone sees the
    # padding (a property of the model), so only equal sizes make batch == single exact.
    images = make_images([(64, 48)] * 3, seed=2)
    model = load("background", tiny_cfg, first_stuff_id=0, batch_size=2)
    batched = model(images)
    for image, segments in zip(images, batched, strict=True):
        (single,) = model([image])
        assert [s.label for s in single] == [s.label for s in segments]
        for a, b in zip(single, segments, strict=True):
            np.testing.assert_array_equal(a.mask, b.mask)
            assert a.score == pytest.approx(b.score, abs=1e-5)


def test_padding_is_cropped_before_resizing():
    logits = torch.arange(2 * 8 * 12, dtype=torch.float32).reshape(2, 8, 12)
    pixel_mask = torch.zeros(1, 32, 48, dtype=torch.long)
    pixel_mask[0, :20, :30] = 1  # valid region of a 32x48 padded input -> 5x7.5 cells of the 8x12 map
    cropped = Mask2FormerBackground._crop_padding(logits, pixel_mask, 0)
    assert cropped.shape == (2, 5, 8)
    torch.testing.assert_close(cropped, logits[:, :5, :8])
    assert Mask2FormerBackground._crop_padding(logits, None, 0) is logits


def test_segments_from_panoptic():
    segmentation = np.array([[1, 1, 2], [3, 3, 0]], dtype=np.int32)
    infos = [
        {"id": 1, "label_id": 4, "score": 0.6},
        {"id": 2, "label_id": 0, "score": 0.9},  # a thing: dropped
        {"id": 1, "label_id": 4, "score": 0.7},  # fused duplicate: the highest score is kept
        {"id": 3, "label_id": 5, "score": 0.8},
        {"id": 7, "label_id": 5, "score": 0.9},  # not in the map: no empty mask
    ]
    segments = segments_from_panoptic(segmentation, infos, lambda info: info["label_id"] >= 3, LABELS.__getitem__)
    assert [(s.label, s.score) for s in segments] == [("grass", 0.7), ("wall", 0.8)]
    np.testing.assert_array_equal(segments[0].mask, [[True, True, False], [False, False, False]])
    assert segments_from_panoptic(segmentation, [], lambda info: True, str) == []


def test_grayscale_and_empty_batch(background, make_images):
    gray = make_images([(40, 30)])[0].convert("L")
    check_outputs(background([gray]), [gray], {"sky", "grass", "wall"})
    assert background([]) == []


def test_bfloat16_on_cpu(tiny_cfg, images, load):
    check_outputs(load("background", tiny_cfg, dtype="bfloat16")(images), images, {"sky", "grass", "wall"})


def test_config_errors(tiny_cfg, tmp_path, load):
    with pytest.raises(AnnotatorError, match=r"unknown config keys \['stuff'\]"):
        annotators.build("background", tiny_cfg | {"stuff": ["sky"]})
    with pytest.raises(AnnotatorError, match=r"missing required config keys \['model'\]"):
        annotators.build("background", {"backend": "mask2former"})
    with pytest.raises(AnnotatorError, match=r"stuff_classes not in the model's id2label: \['ocean', 99\]"):
        load("background", tiny_cfg, stuff_classes=["sky", "ocean", 99])
    missing = tmp_path / "no_model"
    with pytest.raises(AnnotatorError, match=str(missing)):
        load("background", tiny_cfg, model=str(missing))


def test_call_before_load_is_an_error(tiny_cfg, images):
    with pytest.raises(AnnotatorError, match="load"):
        annotators.build("background", tiny_cfg)(images)


@pytest.mark.skipif(importlib.util.find_spec("detectron2") is not None, reason="detectron2 is installed")
def test_maskdino_missing_dependency_names_the_image(tmp_path):
    model = annotators.build("background", {
        "backend": "maskdino", "config_file": str(tmp_path / "maskdino.yaml"), "checkpoint": str(tmp_path / "m.pth"),
    })
    assert isinstance(model, MaskDinoBackground)
    with pytest.raises(MissingDependencyError, match="docker/Dockerfile.cuda"):
        model.load()
    with pytest.raises(AnnotatorError, match=r"unknown config keys \['model'\]"):
        annotators.build("background", {"backend": "maskdino", "config_file": "a", "checkpoint": "b", "model": "c"})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_half_precision(tiny_cfg, dtype, images, load):
    check_outputs(load("background", tiny_cfg, device="cuda", dtype=dtype)(images), images, {"sky", "grass", "wall"})
