"""Region captioners ``vlm-box`` (tiny LLaVA) and ``crop`` (around a tiny BLIP-2); ``gpt4roi`` without its package:
its errors, config, prompt/box/answer helpers and its batching plumbing around a stub model (not GPT4RoI itself)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from PIL import Image

import annotators
from annotators import AnnotatorError, MissingDependencyError
from annotators.prompts import load_prompts
from annotators.region_captioner import CropCaptioner, VlmBoxCaptioner, crop_box
from annotators.region_captioner_gpt4roi import (
    Gpt4RoiCaptioner,
    StopWhenAllAnswered,
    gpt4roi_answer,
    gpt4roi_boxes,
    gpt4roi_question,
)
from data_schemas import RegionCaption

BOXES = [  # per image of the shared ``images`` fixture (64x48, 100x100, 37x81)
    np.array([[2.0, 3.0, 30.0, 40.0], [0.0, 0.0, 64.0, 48.0]], dtype=np.float32),
    np.zeros((0, 4), dtype=np.float32),
    [[5.0, 60.0, 12.0, 70.0]],
]


@pytest.fixture(scope="module")
def vlm_box_cfg(tmp_path_factory) -> dict:
    return VlmBoxCaptioner.create_tiny(tmp_path_factory.mktemp("tiny_vlm")) | {"device": "cpu"}


@pytest.fixture(scope="module")
def crop_cfg(tmp_path_factory) -> dict:
    cfg = CropCaptioner.create_tiny(tmp_path_factory.mktemp("tiny_blip2"))
    return {**cfg, "captioner": {**cfg["captioner"], "device": "cpu"}}


def _check(out, n_boxes: list[int], max_per_box: int, annotator: str) -> None:
    assert [len(per_image) for per_image in out] == n_boxes
    assert any(caps for per_image in out for caps in per_image), "no captions at all"
    for per_image in out:
        for captions in per_image:
            assert len(captions) <= max_per_box
            assert len({c.text for c in captions}) == len(captions)
            for c in captions:
                assert isinstance(c, RegionCaption) and c.annotator == annotator and c.text == c.text.strip() != ""
                RegionCaption.model_validate(c.model_dump())


def _texts(out) -> list[list[list[str]]]:
    return [[[c.text for c in caps] for caps in per_image] for per_image in out]


def test_crop_box_pads_grows_and_clips():
    image = Image.new("RGB", (100, 80))
    assert crop_box(image, [20, 20, 40, 60], pad=0.1, min_size=1).size == (24, 48)  # 18..42 x 16..64
    assert crop_box(image, [50, 50, 52, 52], pad=0.0, min_size=16).size == (16, 16)
    assert crop_box(image, [50, 50, 52, 51], pad=0.0, min_size=16).size == (16, 17)  # 42.5..58.5 rounds outward
    assert crop_box(image, [90, 70, 100, 80], pad=0.5, min_size=1).size == (15, 15)  # clipped at the border
    assert crop_box(image, [99.5, 79.5, 100, 80], pad=0.0, min_size=1).size == (1, 1)


def test_vlm_box_structure_batching_and_prompts(vlm_box_cfg, images, load):
    captioner = load("region_captioner", vlm_box_cfg, batch_size=3)
    prompts: list[str] = []
    chat_texts = captioner.generator.chat_texts

    def spy(texts):
        prompts.extend(texts)
        return chat_texts(texts)

    captioner.generator.chat_texts = spy
    out = captioner(images, BOXES)
    _check(out, [2, 0, 1], 1, "vlm-box")
    # Shikra's frame: 64x48 padded to 64x64 (8 px on top), 37x81 to 81x81 (22 px on the left)
    assert prompts == [
        "What is in the region [0.031,0.172,0.469,0.750]? Answer briefly.",
        "What is in the region [0.000,0.125,1.000,0.875]? Answer briefly.",
        "What is in the region [0.333,0.741,0.420,0.864]? Answer briefly.",
    ]
    assert all(c.prompt == prompts[0] for c in out[0][0])
    one = load("region_captioner", vlm_box_cfg, batch_size=1)
    assert _texts(one(images, BOXES)) == _texts(out)
    assert _texts(one(images[2:], BOXES[2:])) == _texts(out)[2:]
    assert captioner.version == vlm_box_cfg["model"] and captioner.kind == "region_captioner"


def test_vlm_box_beams(vlm_box_cfg, images, load):
    captioner = load("region_captioner", vlm_box_cfg, num_beams=2, num_return_sequences=2, prompt="Region {box}:")
    _check(captioner(images, BOXES), [2, 0, 1], 2, "vlm-box")


def test_crop_structure_batching_and_crop_sizes(crop_cfg, images, load):
    captioner = load("region_captioner", crop_cfg, captioner={**crop_cfg["captioner"], "batch_size": 3})
    seen: list[tuple[int, int]] = []
    inner_call = type(captioner.captioner).__call__

    class Spy:
        name, version = captioner.captioner.name, captioner.captioner.version

        def __call__(self, crops):
            seen.extend(c.size for c in crops)
            return inner_call(inner, crops)

    inner = captioner.captioner
    captioner.captioner = Spy()
    out = captioner(images, BOXES)
    _check(out, [2, 0, 1], 2, "crop+blip2")
    assert seen == [(33, 44), (64, 48), (17, 16)]  # padded by 10 %, clipped; the 7x10 box grown to >= 16 px
    one = load("region_captioner", crop_cfg, captioner={**crop_cfg["captioner"], "batch_size": 1})
    assert _texts(one(images, BOXES)) == _texts(out)
    assert captioner.version.startswith("blip2@")


@pytest.mark.parametrize("fixture", ["vlm_box_cfg", "crop_cfg"])
def test_empty_boxes_and_bad_inputs(request, fixture, images, load):
    captioner = load("region_captioner", request.getfixturevalue(fixture))
    assert captioner(images, [[], np.zeros((0, 4)), []]) == [[], [], []]
    assert captioner([], []) == []
    with pytest.raises(ValueError, match="3 images but 2"):
        captioner(images, BOXES[:2])
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        captioner(images, [[[1, 2, 3]], [], []])


def test_config_errors(vlm_box_cfg, crop_cfg, tmp_path, load):
    with pytest.raises(AnnotatorError, match="unknown box_format 'xyxy'"):
        annotators.build("region_captioner", {**vlm_box_cfg, "box_format": "xyxy"})
    with pytest.raises(AnnotatorError, match="placeholder"):
        annotators.build("region_captioner", {**vlm_box_cfg, "prompt": "What is this?"})
    with pytest.raises(AnnotatorError, match=r"missing required config keys \['captioner'\]"):
        annotators.build("region_captioner", {"backend": "crop"})
    with pytest.raises(AnnotatorError, match="captioner config mapping"):
        annotators.build("region_captioner", {"backend": "crop", "captioner": "blip2"})
    with pytest.raises(AnnotatorError, match=r"unknown config keys \['beams'\]"):
        annotators.build("region_captioner", {**crop_cfg, "captioner": {**crop_cfg["captioner"], "beams": 2}})
    with pytest.raises(AnnotatorError, match="no captioner backend 'blip3'"):
        annotators.build("region_captioner", {"backend": "crop", "captioner": {"backend": "blip3"}})
    missing = tmp_path / "no_such_model"
    with pytest.raises(AnnotatorError, match=str(missing)):
        load("region_captioner", {"backend": "vlm-box", "model": str(missing)})


@pytest.mark.skipif(importlib.util.find_spec("gpt4roi") is not None, reason="gpt4roi is installed")
def test_gpt4roi_missing_package_names_the_docker_image(tmp_path, images):
    captioner = annotators.build("region_captioner", {"backend": "gpt4roi", "model": str(tmp_path)})
    with pytest.raises(MissingDependencyError, match="docker/Dockerfile.cuda"):
        captioner.load()
    with pytest.raises(AnnotatorError, match="not loaded"):
        captioner(images, BOXES)
    with pytest.raises(MissingDependencyError, match="docker/Dockerfile.cuda"):
        Gpt4RoiCaptioner.create_tiny(tmp_path)


def test_gpt4roi_from_config_accepts_and_rejects_keys():
    cfg = {
        "backend": "gpt4roi",
        "model": "/models/GPT4RoI-7B",
        "prompt": "What is {region}?",
        "max_new_tokens": 16,
        "device": "cuda:1",
        "dtype": "bfloat16",
        "batch_size": 4,
    }
    captioner = annotators.build("region_captioner", cfg)  # builds without importing gpt4roi or loading anything
    assert isinstance(captioner, Gpt4RoiCaptioner) and captioner.kind == "region_captioner"
    assert (captioner.prompt_set, captioner.max_new_tokens, captioner.batch_size) == (["What is {region}?"], 16, 4)
    assert (captioner.device_name, captioner.dtype_name) == ("cuda:1", "bfloat16")
    assert captioner.version == "/models/GPT4RoI-7B"
    defaults = Gpt4RoiCaptioner.from_config({"backend": "gpt4roi", "model": "m"})
    # the paper gives region captioners 5 prompts: by default every box is asked each of GPT4RoI's 5
    assert defaults.prompt_set == load_prompts("gpt4roi_region", placeholder="{region}")
    assert len(defaults.prompt_set) == 5 and defaults.prompts.sampler.per_item == 5
    assert (defaults.dtype_name, defaults.max_new_tokens) == ("float16", 64)
    two = annotators.build("region_captioner", {**cfg, "prompt": None, "prompts": "gpt4roi_region",
                                                "prompts_per_region": 2})
    assert two.prompts.sampler.per_item == 2
    with pytest.raises(AnnotatorError, match=r"unknown config keys \['num_beams', 'temperature'\]"):
        annotators.build("region_captioner", {**cfg, "num_beams": 2, "temperature": 0.2})
    with pytest.raises(AnnotatorError, match=r"missing required config keys \['model'\]"):
        annotators.build("region_captioner", {"backend": "gpt4roi", "prompt": "What is {region}?"})
    for prompt in ["What is this?", "{region} and {region}"]:
        with pytest.raises(AnnotatorError, match="exactly one"):
            annotators.build("region_captioner", {**cfg, "prompt": prompt})
    with pytest.raises(AnnotatorError, match="must not contain"):
        annotators.build("region_captioner", {**cfg, "prompt": "What is {region} <bbox>?"})
    with pytest.raises(AnnotatorError, match="must not contain"):
        annotators.build("region_captioner", {**cfg, "prompt": None, "prompts": ["Is {region} <image>?"]})
    with pytest.raises(AnnotatorError, match="either 'prompt'"):
        annotators.build("region_captioner", {**cfg, "prompts": "gpt4roi_region"})
    with pytest.raises(AnnotatorError, match=r"in 1\.\.5"):
        annotators.build("region_captioner", {**cfg, "prompt": None, "prompts_per_region": 6})
    with pytest.raises(AnnotatorError, match=">= 1"):
        annotators.build("region_captioner", {**cfg, "batch_size": 0})


def test_gpt4roi_prompt_boxes_and_answers():
    assert gpt4roi_question("What is {region}?") == (
        "The <image> provides an overview of the picture.\nWhat is region1 <bbox>?"
    )
    rel = gpt4roi_boxes(np.array([[10, 20, 50, 90], [-4, 0, 130, 25.5]]), 100, 50)
    np.testing.assert_allclose(rel, [[0.1, 0.4, 0.5, 1.0], [0.0, 0.0, 1.0, 0.51]], rtol=1e-6)
    assert rel.dtype == np.float32 and gpt4roi_boxes(np.zeros((0, 4)), 3, 3).shape == (0, 4)
    assert gpt4roi_answer("Assistant: a red car parked on the street\n###") == "a red car parked on the street"
    assert gpt4roi_answer(" Assistant:a dog\n### Human: and region2?") == "a dog"
    assert gpt4roi_answer("###") == ""


class _StubTokenizer:
    """Token id t decodes to ``words[t]``; ``batch_decode`` joins a row's words (pad/eos id 0 is special)."""

    eos_token_id = pad_token_id = 0
    words = {1: "Assistant:", 2: " a", 3: " cat", 4: "\n###", 5: " dog", 9: " prompt"} | {
        20 + n: f" {n}" for n in range(10)}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.words[int(t)] for t in ids if int(t) != 0 or not skip_special_tokens)

    def batch_decode(self, rows, skip_special_tokens=True):
        return [self.decode(row, skip_special_tokens) for row in rows]


class _StubModel:
    """Answers "a cat <L>" for boxes in the left half of the image, "a dog <L>" otherwise (L: the prompt's length),
    stopping on the criterion."""

    def __init__(self):
        self.calls = []

    def forward(self, *args, **kwargs):
        raise AssertionError("the stub is only generated from")

    def generate(self, input_ids, images, stopping_criteria, max_new_tokens, **kwargs):
        import torch

        bboxes = self.forward.keywords["bboxes"]  # what app.py's functools.partial hands the real forward
        self.calls.append((tuple(images.shape), [b.tolist() for b in bboxes], kwargs))
        answers = [[1, 2, 3 if b[0, 2] <= 0.5 else 5, 20 + input_ids.shape[1], 4] for b in bboxes]
        out = input_ids
        for step in range(max_new_tokens):
            out = torch.cat([out, torch.tensor([[a[min(step, 4)]] for a in answers])], dim=1)
            if all(c(out, None) for c in stopping_criteria):
                break
        return out


def test_gpt4roi_batching_plumbing_with_a_stub_model(images):
    """Not GPT4RoI: checks the adapter's own work (pixels, relative boxes per row through the forward partial,
    batches of ``batch_size``, answer cleaning, regrouping) around stand-ins for the model and tokenizer."""
    import torch

    captioner = Gpt4RoiCaptioner.from_config({"backend": "gpt4roi", "model": "m", "batch_size": 2,
                                              "prompts": ["A {region}?", "Bb {region}?"]})
    stub = _StubModel()

    class Processor:
        def preprocess(self, image, do_center_crop, return_tensors):
            assert do_center_crop is False and image.mode == "RGB"
            return {"pixel_values": torch.zeros(1, 3, image.height, image.width)}

    captioner._model, captioner._tokenizer, captioner._image_processor = stub, _StubTokenizer(), Processor()
    captioner._prompt_ids = {"A {region}?": torch.tensor([[9, 9]]), "Bb {region}?": torch.tensor([[9, 9, 9]])}
    captioner._device, captioner._dtype = torch.device("cpu"), torch.float32
    out = captioner(images, BOXES)
    # every box is asked both prompts (a 2-token and a 3-token prompt), each answer recording its prompt
    assert [sorted(caps) for per_image in _texts(out) for caps in per_image] == [
        ["a cat 2", "a cat 3"], ["a dog 2", "a dog 3"], ["a cat 2", "a cat 3"]]
    _check(out, [2, 0, 1], 2, "gpt4roi")
    assert {(c.text[-1], c.prompt) for per_image in out for caps in per_image for c in caps} == {
        ("2", "A {region}?"), ("3", "Bb {region}?")}
    # one prompt per generate, in batches of 2 jobs: 3 boxes x 2 prompts -> 4 calls
    assert [c[0] for c in stub.calls] == [(2, 3, 224, 224), (1, 3, 224, 224)] * 2
    rows = [box for call in stub.calls for box in call[1]]
    expected = [[2 / 64, 3 / 48, 30 / 64, 40 / 48], [0, 0, 1, 1], [5 / 37, 60 / 81, 12 / 37, 70 / 81]] * 2
    np.testing.assert_allclose(np.array(rows).reshape(6, 4), expected, rtol=1e-6)
    assert stub.calls[0][2]["do_sample"] is False
    assert "forward" not in vars(stub)  # the partial is removed again
    assert captioner(images, [[], [], []]) == [[], [], []] and captioner([], []) == []


def test_stop_when_all_answered_waits_for_every_row():
    import torch

    stop = StopWhenAllAnswered(_StubTokenizer(), start=1, eos_id=0)
    assert not stop(torch.tensor([[9, 1, 4], [9, 1, 2]]), None)  # row 1 not done: upstream's row-0 check would stop
    assert stop(torch.tensor([[9, 1, 4], [9, 0, 0]]), None)  # row 1 ended with eos
    assert not stop(torch.tensor([[4, 1, 2]]), None)  # a "###" inside the prompt does not count
