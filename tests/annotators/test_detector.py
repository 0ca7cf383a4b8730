"""Detector backends through their real loading code with tiny random models (shapes, batching, errors)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import annotators
from annotators import AnnotatorError, DetectorOutput, MissingDependencyError
from annotators.detector import HfDetector, ViTDetDetector


@pytest.fixture(scope="module")
def closed_cfg(tmp_path_factory) -> dict:
    return HfDetector.create_tiny(tmp_path_factory.mktemp("tiny_detr"))


@pytest.fixture(scope="module")
def open_cfg(tmp_path_factory) -> dict:
    return HfDetector.create_tiny(tmp_path_factory.mktemp("tiny_owlv2"), open_vocabulary=True)


@pytest.fixture(scope="module")
def detector(closed_cfg, load):
    return load("detector", closed_cfg)


@pytest.fixture(scope="module")
def open_detector(open_cfg, load):
    return load("detector", open_cfg)


def check_outputs(outputs, images, allowed_labels) -> None:
    assert len(outputs) == len(images)
    for output, image in zip(outputs, images, strict=True):
        assert isinstance(output, DetectorOutput)
        n = len(output.labels)
        assert output.boxes_xyxy.shape == (n, 4) and output.boxes_xyxy.dtype == np.float32
        assert output.scores.shape == (n,) and output.scores.dtype == np.float32
        assert all(isinstance(label, str) and label in allowed_labels for label in output.labels)
        boxes = output.boxes_xyxy
        assert np.all(boxes[:, 0::2] >= 0) and np.all(boxes[:, 0::2] <= image.width)
        assert np.all(boxes[:, 1::2] >= 0) and np.all(boxes[:, 1::2] <= image.height)
        assert np.all(boxes[:, 2] >= boxes[:, 0]) and np.all(boxes[:, 3] >= boxes[:, 1])
        assert np.all((output.scores >= 0) & (output.scores <= 1))


def assert_same(a: list[DetectorOutput], b: list[DetectorOutput]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.labels == y.labels
        np.testing.assert_allclose(x.boxes_xyxy, y.boxes_xyxy, atol=1e-3)
        np.testing.assert_allclose(x.scores, y.scores, atol=1e-5)


def test_build_resolves_hf_backend(detector, closed_cfg):
    assert isinstance(detector, HfDetector)
    assert (detector.kind, detector.name, detector.instance_name) == ("detector", "hf", "tiny-detr")
    assert closed_cfg["model"] in detector.version
    assert not detector.open_vocabulary


def test_closed_vocabulary_outputs(detector, images):
    outputs = detector(images)
    check_outputs(outputs, images, set(detector._model.config.id2label.values()))
    assert sum(len(o.labels) for o in outputs) > 0  # threshold 0: every query is returned


def test_batching_equals_one_by_one(closed_cfg, make_images, load):
    # Same-size images: DETR pads a batch to its largest image, and padding changes CNN border features
    # (a property of the model, not of this wrapper), so only equal sizes make batch == single exact.
    images = make_images([(64, 48)] * 3, seed=1)
    det = load("detector", closed_cfg, batch_size=2)
    batched = det(images)
    single = [det([image])[0] for image in images]
    assert_same(batched, single)


def test_threshold_prefilter(closed_cfg, images, load):
    det = load("detector", closed_cfg, threshold=0.2)
    outputs = det(images)
    assert all(np.all(o.scores > 0.2) for o in outputs)


def test_grayscale_and_empty_batch(detector, make_images):
    gray = make_images([(50, 40)])[0].convert("L")
    (output,) = detector([gray])
    check_outputs([output], [gray], set(detector._model.config.id2label.values()))
    assert detector([]) == []


def test_bfloat16_on_cpu(closed_cfg, images, load):
    det = load("detector", closed_cfg, dtype="bfloat16")
    outputs = det(images)
    check_outputs(outputs, images, set(det._model.config.id2label.values()))
    assert next(det._model.parameters()).dtype == torch.bfloat16


def test_open_vocabulary_outputs_and_batching(open_detector, open_cfg, images):
    outputs = open_detector(images)
    check_outputs(outputs, images, set(open_cfg["vocabulary"]))
    assert {label for o in outputs for label in o.labels} <= set(open_cfg["vocabulary"])
    # OWLv2 pads each image to a square and resizes to a fixed size: no batch padding, batch == single.
    assert_same(outputs, [open_detector([image])[0] for image in images])


def test_open_vocabulary_from_file(open_cfg, tmp_path, images, load):
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("zebra\n\nstop sign\n", encoding="utf-8")
    det = load("detector", open_cfg, vocabulary=str(vocab_file))
    assert det.vocabulary == ["zebra", "stop sign"]
    check_outputs(det(images), images, {"zebra", "stop sign"})


def test_empty_vocabulary_is_an_error(open_cfg, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(AnnotatorError, match="vocabulary is empty"):
        annotators.build("detector", open_cfg | {"vocabulary": str(empty)}).load()


def test_config_errors_name_the_keys(closed_cfg):
    with pytest.raises(AnnotatorError, match=r"unknown config keys \['thresh'\]"):
        annotators.build("detector", closed_cfg | {"thresh": 0.3})
    with pytest.raises(AnnotatorError, match=r"missing required config keys \['model'\]"):
        annotators.build("detector", {"backend": "hf"})
    with pytest.raises(AnnotatorError, match="batch_size"):
        annotators.build("detector", closed_cfg | {"batch_size": 0})


def test_missing_model_dir_names_the_path(tmp_path):
    missing = tmp_path / "no_such_model"
    det = annotators.build("detector", {"backend": "hf", "model": str(missing), "device": "cpu"})
    with pytest.raises(AnnotatorError, match=str(missing)):
        det.load()


def test_device_and_dtype_errors(closed_cfg):
    with pytest.raises(AnnotatorError, match="unknown device"):
        annotators.build("detector", closed_cfg | {"device": "tpu"}).load()
    with pytest.raises(AnnotatorError, match="float16 needs a CUDA device"):
        annotators.build("detector", closed_cfg | {"dtype": "float16"}).load()
    with pytest.raises(AnnotatorError, match="unknown dtype"):
        annotators.build("detector", closed_cfg | {"dtype": "int8"}).load()
    if not torch.cuda.is_available():
        with pytest.raises(AnnotatorError, match="CUDA is not available"):
            annotators.build("detector", closed_cfg | {"device": "cuda:1"}).load()


def test_call_before_load_is_an_error(closed_cfg, images):
    with pytest.raises(AnnotatorError, match="load"):
        annotators.build("detector", closed_cfg)(images)


@pytest.mark.skipif(importlib.util.find_spec("detectron2") is not None, reason="detectron2 is installed")
def test_vitdet_missing_detectron2_names_the_image(tmp_path):
    det = annotators.build("detector", {
        "backend": "vitdet", "config_file": str(tmp_path / "vitdet.py"), "checkpoint": str(tmp_path / "m.pth"),
        "name": "bigdet", "class_names": ["a"],
    })
    assert isinstance(det, ViTDetDetector) and det.instance_name == "bigdet"
    with pytest.raises(MissingDependencyError, match="docker/Dockerfile.cuda"):
        det.load()


def test_vitdet_config_errors():
    with pytest.raises(AnnotatorError, match=r"missing required config keys \['checkpoint'\]"):
        annotators.build("detector", {"backend": "vitdet", "config_file": "x.py"})
    with pytest.raises(AnnotatorError, match=r"unknown config keys \['model'\]"):
        annotators.build("detector", {"backend": "vitdet", "config_file": "x.py", "checkpoint": "m", "model": "y"})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("vocab", [False, True], ids=["closed", "open"])
def test_cuda_half_precision(closed_cfg, open_cfg, dtype, vocab, images, load):
    cfg = (open_cfg if vocab else closed_cfg) | {"device": "cuda", "dtype": dtype}
    det = load("detector", cfg)
    allowed = set(open_cfg["vocabulary"]) if vocab else set(det._model.config.id2label.values())
    check_outputs(det(images), images, allowed)
