"""``open_clip`` scorer through a tiny random open_clip checkpoint loaded with ``pretrained=<file>``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import annotators
from annotators import AnnotatorError
from annotators.scorer import OpenClipScorer

TEXTS = [["a photo of a three", "a red seven", "three"], [], ["a cat on a coffee background"]]


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory) -> dict:
    return OpenClipScorer.create_tiny(tmp_path_factory.mktemp("tiny_clip")) | {"device": "cpu"}


@pytest.fixture(scope="module")
def scorer(tiny_cfg, load):
    return load("scorer", tiny_cfg, batch_size=3)


def test_one_score_array_per_image(scorer, images):
    out = scorer(images, TEXTS)
    assert [s.shape for s in out] == [(3,), (0,), (1,)]
    assert all(s.dtype == np.float32 for s in out)
    assert all(np.all(np.abs(s) <= 1.0 + 1e-6) for s in out)
    assert scorer.kind == "scorer" and scorer.name == "open_clip" and scorer.version.startswith("umg-tiny-clip:")


def test_batched_equals_one_by_one(tiny_cfg, scorer, images, load):
    one = load("scorer", tiny_cfg, batch_size=1, text_batch_size=1)
    for a, b in zip(scorer(images, TEXTS), one(images, TEXTS), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    singles = [scorer([im], [texts])[0] for im, texts in zip(images, TEXTS, strict=True)]
    for a, b in zip(scorer(images, TEXTS), singles, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_matches_open_clip_directly(tiny_cfg, scorer, images):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(tiny_cfg["model"], pretrained=tiny_cfg["pretrained"])
    tokenizer = open_clip.get_tokenizer(tiny_cfg["model"])
    with torch.no_grad():
        image = model.encode_image(preprocess(images[0]).unsqueeze(0), normalize=True)
        text = model.encode_text(tokenizer(TEXTS[0]), normalize=True)
    np.testing.assert_allclose(scorer(images[:1], TEXTS[:1])[0], (text @ image[0]).numpy(), atol=1e-5)


def test_empty_inputs(scorer, images):
    assert scorer([], []) == []
    assert [s.shape for s in scorer(images, [[], [], []])] == [(0,), (0,), (0,)]


def test_wrong_per_image_lengths(scorer, images):
    with pytest.raises(ValueError, match="3 images but 2"):
        scorer(images, TEXTS[:2])


def test_config_errors(tiny_cfg, tmp_path, load):
    with pytest.raises(AnnotatorError, match=r"unknown config keys \['precision'\]"):
        annotators.build("scorer", {**tiny_cfg, "precision": "fp16"})
    with pytest.raises(AnnotatorError, match="file stem"):
        annotators.build("scorer", {**tiny_cfg, "model": "ViT-B-32"})
    with pytest.raises(AnnotatorError, match="unknown dtype .float8."):
        load("scorer", tiny_cfg, dtype="float8")
    missing = tmp_path / "missing.json"
    with pytest.raises(AnnotatorError, match=str(missing)):
        load("scorer", tiny_cfg, model="missing", model_config=str(missing))
    with pytest.raises(AnnotatorError, match="missing.safetensors"):
        load("scorer", tiny_cfg, pretrained=str(tmp_path / "missing.safetensors"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_is_a_clear_error(tiny_cfg, load):
    with pytest.raises(AnnotatorError, match="CUDA is not available"):
        load("scorer", tiny_cfg, device="cuda")


@pytest.mark.gpu
def test_cuda_bf16_scores_close_to_cpu(tiny_cfg, scorer, images, load):
    gpu = load("scorer", tiny_cfg, device="cuda", dtype="bfloat16")
    for a, b in zip(gpu(images, TEXTS), scorer(images, TEXTS), strict=True):
        np.testing.assert_allclose(a, b, atol=5e-2)
