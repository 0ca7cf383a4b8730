"""Captioners ``blip2`` and ``vlm`` through tiny random transformers models saved and reloaded with from_pretrained.

Random models write gibberish: only structure is checked, never text content.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import annotators
from annotators import AnnotatorError
from data_schemas import Caption


def _check_captions(out, n_images: int, max_per_image: int, annotator: str) -> None:
    assert len(out) == n_images
    assert any(out), "no captions at all"  # one image may legitimately get none (whitespace-only output)
    for captions in out:
        assert len(captions) <= max_per_image
        texts = [c.text for c in captions]
        assert len(set(texts)) == len(texts)
        for c in captions:
            assert isinstance(c, Caption) and c.annotator == annotator and c.kept and c.clip_score is None
            assert c.text == c.text.strip() and c.text
            Caption.model_validate(c.model_dump())


def _texts(out) -> list[list[str]]:
    return [[c.text for c in captions] for captions in out]


@pytest.mark.parametrize("backend_cfg", ["blip2_cfg", "vlm_cfg"])
def test_captions_schema_and_batching(request, backend_cfg, images, load):
    cfg = request.getfixturevalue(backend_cfg)
    batched = load("captioner", cfg, batch_size=3)
    out = batched(images)
    _check_captions(out, 3, cfg.get("num_return_sequences", 1), cfg["backend"])
    assert _texts(load("captioner", cfg, batch_size=1)(images)) == _texts(out)
    assert _texts(batched(images[1:2])) == _texts(out)[1:2]
    assert batched.version == cfg["model"] and batched.kind == "captioner"
    assert batched([]) == []


def test_vlm_left_padding_batches_like_single_inputs(vlm_cfg, images, load):
    generator = load("captioner", vlm_cfg).generator
    prompts = ["Hi.", "Describe the picture in a few words, please, and name every digit.", "What is this?"]
    batched = generator.generate(images, prompts)
    assert batched == [generator.generate([im], [p])[0] for im, p in zip(images, prompts, strict=True)]
    assert all(len(texts) == 1 for texts in batched)


def test_blip2_prompt_and_several_sequences(blip2_cfg, images, load):
    captioner = load("captioner", blip2_cfg, prompt="a photo of", num_beams=3, num_return_sequences=3, batch_size=2)
    _check_captions(captioner(images), 3, 3, "blip2")


def test_vlm_beams_and_custom_prompt(vlm_cfg, images, load):
    captioner = load("captioner", vlm_cfg, prompt="What digits are there?", num_beams=2, num_return_sequences=2)
    _check_captions(captioner(images), 3, 2, "vlm")


def test_sampling_allows_more_sequences_than_beams(blip2_cfg, images, load):
    torch.manual_seed(0)
    captioner = load("captioner", blip2_cfg, num_beams=1, num_return_sequences=4, generate_kwargs={"do_sample": True})
    _check_captions(captioner(images[:2]), 2, 4, "blip2")


@pytest.mark.parametrize("backend_cfg", ["blip2_cfg", "vlm_cfg"])
def test_config_errors(request, backend_cfg):
    cfg = request.getfixturevalue(backend_cfg)
    with pytest.raises(AnnotatorError, match=r"unknown config keys \['beams'\]"):
        annotators.build("captioner", {**cfg, "beams": 2})
    with pytest.raises(AnnotatorError, match=r"missing required config keys \['model'\]"):
        annotators.build("captioner", {"backend": cfg["backend"]})
    with pytest.raises(AnnotatorError, match="do_sample"):
        annotators.build("captioner", {**cfg, "num_beams": 1, "num_return_sequences": 3})


@pytest.mark.parametrize("backend", ["blip2", "vlm"])
def test_missing_or_non_model_dir_names_the_path(backend, tmp_path, load):
    missing = tmp_path / "no_such_model"
    with pytest.raises(AnnotatorError, match=f"{missing} does not exist"):
        load("captioner", {"backend": backend, "model": str(missing), "device": "cpu"})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AnnotatorError, match=f"{empty} is not a model folder"):
        load("captioner", {"backend": backend, "model": str(empty), "device": "cpu"})


def test_blip2_query_token_mismatch_is_an_error(blip2_cfg, tmp_path, load):
    broken = tmp_path / "broken"
    shutil.copytree(blip2_cfg["model"], broken)
    processor_config = broken / "processor_config.json"
    data = json.loads(processor_config.read_text())
    data["num_query_tokens"] = 3
    processor_config.write_text(json.dumps(data))
    with pytest.raises(AnnotatorError, match="num_query_tokens 3 != model's 4"):
        load("captioner", blip2_cfg, model=str(broken))


def test_call_before_load_is_an_error(blip2_cfg, images):
    with pytest.raises(AnnotatorError, match="load"):
        annotators.build("captioner", blip2_cfg)(images)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_is_a_clear_error(vlm_cfg, load):
    with pytest.raises(AnnotatorError, match="CUDA is not available"):
        load("captioner", vlm_cfg, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend_cfg", ["blip2_cfg", "vlm_cfg"])
def test_cuda_bf16_generates(request, backend_cfg, images, load):
    cfg = request.getfixturevalue(backend_cfg)
    captioner = load("captioner", cfg, device="cuda", dtype="bfloat16", batch_size=3)
    model = captioner.model if hasattr(captioner, "model") else captioner.generator.model
    assert next(model.parameters()).is_cuda
    _check_captions(captioner(images), 3, cfg.get("num_return_sequences", 1), cfg["backend"])
