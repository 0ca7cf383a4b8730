"""``engine: vllm`` on the ``vlm-box`` region captioner and the ``vlm`` captioner, against a fake ``vllm`` module put
in ``sys.modules`` by these tests: it records what the backend gives vLLM's offline API (``LLM(...)``,
``LLM.generate(requests, SamplingParams)``) and answers each request with its own prompt line and image size, so
the tests check the requests (prompt text = the HF path's, image, one ``generate`` per call, greedy sampling) and
the mapping of outputs back to images and boxes. No GPU and no real vLLM needed; vLLM's own numerics are not
tested here (docs/annotators.md states the tolerance)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

import annotators
from annotators import AnnotatorError, MissingDependencyError
from annotators.captioner import VlmCaptioner
from annotators.region_captioner import VlmBoxCaptioner
from annotators.vllm_engine import sampling_kwargs

BOXES = [  # per image of the shared ``images`` fixture (64x48, 100x100, 37x81)
    np.array([[2.0, 3.0, 30.0, 40.0], [0.0, 0.0, 64.0, 48.0]], dtype=np.float32),
    np.zeros((0, 4), dtype=np.float32),
    [[5.0, 60.0, 12.0, 70.0], [1.0, 1.0, 36.0, 80.0]],
]


class FakeLLM:
    """Records its constructor's keyword arguments and every ``generate`` call; answers each request with the
    user prompt (the tiny chat template renders ``USER: <image>\\n{prompt}ASSISTANT:``) and its image's size,
    padded with whitespace the backend must strip, ``n`` completions each."""

    instances: list[FakeLLM] = []

    def __init__(self, **kwargs) -> None:
        self.kwargs, self.calls = kwargs, []
        FakeLLM.instances.append(self)

    def generate(self, requests, sampling_params, use_tqdm=True):
        self.calls.append((list(requests), sampling_params))
        outputs = []
        for request in requests:
            line = request["prompt"].split("\n")[1].removesuffix("ASSISTANT:")
            size = request["multi_modal_data"]["image"].size
            texts = [f"  {line} @ {size} #{k}  " for k in range(sampling_params.kwargs["n"])]
            outputs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(text=t) for t in texts]))
        return outputs


class FakeSamplingParams:
    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams, module.__version__ = FakeLLM, FakeSamplingParams, "fake"
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.instances = []
    return module


@pytest.fixture(scope="module")
def box_cfg(tmp_path_factory) -> dict:
    cfg = VlmBoxCaptioner.create_tiny(tmp_path_factory.mktemp("tiny_vlm"))
    return cfg | {"box_format": "llava-1.5", "prompts": "region", "prompts_per_region": 3}


def _record_hf_jobs(backend, monkeypatch) -> dict:
    """Make the HF backend's generator record (images, jobs) and its own chat texts instead of running the model."""
    seen = {}

    def generate_jobs(images, jobs, batch_size):
        seen.update(images=list(images), jobs=list(jobs), texts=backend.generator.chat_texts([p for _, p in jobs]))
        return [["x"] for _ in jobs]

    monkeypatch.setattr(backend.generator, "generate_jobs", generate_jobs)
    return seen


def _same_pixels(a, b) -> bool:
    return a.size == b.size and a.mode == b.mode and a.tobytes() == b.tobytes()


def test_region_captioner_sends_the_hf_prompts_in_one_generate(fake_vllm, box_cfg, images, load, monkeypatch):
    hf = load("region_captioner", box_cfg, device="cpu")
    seen = _record_hf_jobs(hf, monkeypatch)
    hf(images, BOXES)
    engine = load("region_captioner", box_cfg, engine="vllm", engine_kwargs={"gpu_memory_utilization": 0.5})
    out = engine(images, BOXES)

    (llm,) = FakeLLM.instances
    assert llm.kwargs == {"model": box_cfg["model"], "enable_prefix_caching": True, "limit_mm_per_prompt": {"image": 1},
                          "dtype": "float32", "gpu_memory_utilization": 0.5}
    (requests, params), = llm.calls  # every (box, prompt) job of the call in one generate
    assert len(requests) == len(seen["jobs"]) == 4 * 3
    assert [r["prompt"] for r in requests] == seen["texts"]  # the HF path's chat-template text, job by job
    for request, (i, _) in zip(requests, seen["jobs"], strict=True):
        assert _same_pixels(request["multi_modal_data"]["image"], seen["images"][i])  # padded to square as HF's
    assert params.kwargs == {"max_tokens": box_cfg["max_new_tokens"], "n": 1, "temperature": 0.0}

    assert [len(per_image) for per_image in out] == [2, 0, 2]
    prompts = iter(p for _, p in seen["jobs"])
    for per_image, image in zip(out, images, strict=True):
        padded = (max(image.size),) * 2
        for captions in per_image:
            assert len(captions) == 3
            for caption in captions:  # each answer back on its own image and box, stripped, prompt recorded
                assert caption.prompt == next(prompts)
                assert caption.text == f"{caption.prompt} @ {padded} #0" and caption.annotator == "vlm-box"
    assert engine.version == f"{box_cfg['model']} (vllm)" and hf.version == box_cfg["model"]


def test_image_captioner_sends_the_hf_prompts_in_one_generate(fake_vllm, tmp_path, images, load, monkeypatch):
    cfg = VlmCaptioner.create_tiny(tmp_path) | {"prompts": "shikra_image",
                                                                         "prompts_per_image": 2}
    hf = load("captioner", cfg, device="cpu")
    seen = _record_hf_jobs(hf, monkeypatch)
    hf(images)
    engine = load("captioner", cfg, engine="vllm", shared_prefix=False,
                  generate_kwargs={"do_sample": True, "top_p": 0.9}, num_return_sequences=2)
    out = engine(images)

    (llm,) = FakeLLM.instances
    assert llm.kwargs["enable_prefix_caching"] is False
    (requests, params), = llm.calls
    assert [r["prompt"] for r in requests] == seen["texts"] and len(requests) == 3 * 2
    for request, (i, _) in zip(requests, seen["jobs"], strict=True):
        assert _same_pixels(request["multi_modal_data"]["image"], images[i].convert("RGB"))
    assert params.kwargs == {"max_tokens": cfg["max_new_tokens"], "n": 2, "temperature": 1.0, "top_p": 0.9}
    for captions, image, i in zip(out, images, range(3), strict=True):
        assert [c.prompt for c in captions] == [p for j, p in seen["jobs"] if j == i for _ in range(2)]
        assert [c.text for c in captions] == [f"{c.prompt} @ {image.size} #{k}" for c, k in zip(captions, [0, 1] * 2)]


def test_no_jobs_no_generate(fake_vllm, box_cfg, images, load):
    engine = load("region_captioner", box_cfg, engine="vllm")
    assert engine(images, [np.zeros((0, 4))] * 3) == [[], [], []]
    assert FakeLLM.instances[0].calls == []


def test_missing_vllm_names_its_stage_environment(box_cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed, whatever this machine has
    engine = annotators.build("region_captioner", box_cfg | {"engine": "vllm"})
    with pytest.raises(MissingDependencyError, match=r"own stage environment.*/opt/vllm-venv/bin/python"):
        engine.load()


def test_engine_config_errors(box_cfg):
    def build(**overrides):
        return annotators.build("region_captioner", box_cfg | overrides)

    with pytest.raises(AnnotatorError, match="unknown engine 'sglang'; known: hf, vllm"):
        build(engine="sglang")
    with pytest.raises(AnnotatorError, match="engine hf takes none"):
        build(engine_kwargs={"max_model_len": 4096})
    with pytest.raises(AnnotatorError, match="beam search"):
        build(engine="vllm", num_beams=2)
    with pytest.raises(AnnotatorError, match="use device: auto, cuda or cpu"):
        build(engine="vllm", device="cuda:1")
    with pytest.raises(AnnotatorError, match=r"\['enable_prefix_caching'\] are set from"):
        build(engine="vllm", engine_kwargs={"enable_prefix_caching": False})
    with pytest.raises(AnnotatorError, match=r"\['length_penalty'\] have no vLLM mapping"):
        build(engine="vllm", generate_kwargs={"length_penalty": 1.0})
    with pytest.raises(AnnotatorError, match="call load"):
        build(engine="vllm").generator.generate_jobs([], [(0, "p")], 1)


def test_sampling_kwargs_greedy_unless_sampling():
    assert sampling_kwargs(20, 1, {}) == {"max_tokens": 20, "n": 1, "temperature": 0.0}
    assert sampling_kwargs(20, 1, {"do_sample": False}) == {"max_tokens": 20, "n": 1, "temperature": 0.0}
    assert sampling_kwargs(5, 3, {"do_sample": True, "temperature": 0.7, "top_k": 50}) == {
        "max_tokens": 5, "n": 3, "temperature": 0.7, "top_k": 50}
