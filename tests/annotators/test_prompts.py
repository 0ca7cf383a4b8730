"""Prompt sets, their seeded per-image / per-region sampling, and prompts recorded on the captions (paper App. D):
the captioners through tiny random models (``blip2``, ``vlm``, ``vlm-box``)."""

from __future__ import annotations

import pytest

from annotators import AnnotatorError
from annotators.prompts import BUILTIN_SETS, PromptChoice, PromptSampler, caption_key, image_digest, load_prompts
from annotators.region_captioner import VlmBoxCaptioner


def test_builtin_sets_in_the_papers_style():
    sizes = {name: len(load_prompts(name)) for name in BUILTIN_SETS}
    # the paper's counts (App. D): 9 BLIP-2 prompts, 274 Shikra image prompts, 5 per region captioner
    assert sizes == {"blip2_image": 9, "shikra_image": 274, "region": 5, "gpt4roi_region": 5}
    load_prompts("region", placeholder="{box}")  # every region prompt takes the box
    load_prompts("gpt4roi_region", placeholder="{region}")
    for name, size in sizes.items():  # distinct even with case, punctuation and spacing ignored
        assert len(set(map(caption_key, load_prompts(name)))) == size, name


def test_prompt_files_lists_and_errors(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("# comment\nDescribe {box}.\n\n  Name {box}.  \n")
    assert load_prompts(str(path), placeholder="{box}") == ["Describe {box}.", "Name {box}."]
    assert load_prompts(["a", "b"]) == ["a", "b"]
    with pytest.raises(AnnotatorError, match="duplicate"):
        load_prompts(["a", "a"])
    with pytest.raises(AnnotatorError, match="placeholder"):
        load_prompts(["no box here"], placeholder="{box}")
    with pytest.raises(AnnotatorError, match="cannot read prompt file"):
        load_prompts(str(tmp_path / "missing.txt"))


def test_sampler_is_deterministic_distinct_and_keyed():
    prompts = load_prompts("shikra_image")
    sampler = PromptSampler(prompts, per_item=4, seed=0)
    first = sampler.sample(b"image-1")
    assert first == sampler.sample(b"image-1") == PromptSampler(prompts, 4, 0).sample(b"image-1")
    assert len(set(first)) == 4 and set(first) <= set(prompts)
    assert sampler.sample(b"image-2") != first
    assert PromptSampler(prompts, 4, seed=1).sample(b"image-1") != first
    drawn = {p for k in range(2000) for p in PromptSampler(prompts, 1, 0).sample(k)}
    assert len(drawn) > 0.95 * len(prompts)  # the whole set is used, not a few favourites (uniform: ~99.9 %)
    with pytest.raises(AnnotatorError, match=r"in 1\.\.5"):
        PromptSampler(load_prompts("region"), per_item=6)


def test_prompt_choice_rules():
    assert PromptChoice(None, None, 1, 0, default="d").for_item(b"x") == ["d"]
    with pytest.raises(AnnotatorError, match="either 'prompt'"):
        PromptChoice("p", "region", 1, 0, default="d")
    with pytest.raises(AnnotatorError, match="need a 'prompts' set"):
        PromptChoice(None, None, 3, 0, default="d")


def test_caption_key_ignores_case_punctuation_and_spacing():
    assert caption_key("A dog, on the  beach.") == caption_key("a dog on the beach") == "a dog on the beach"
    assert caption_key("a dog") != caption_key("a cat")


def test_image_digest_follows_pixels(images):
    assert image_digest(images[0]) == image_digest(images[0].copy())
    assert image_digest(images[0]) != image_digest(images[1])


@pytest.mark.parametrize(("fixture", "prompt_set"), [("blip2_cfg", "blip2_image"), ("vlm_cfg", "shikra_image")])
def test_image_captioners_sample_prompts_per_image(request, fixture, prompt_set, images, load):
    cfg = request.getfixturevalue(fixture) | {"prompts": prompt_set, "prompts_per_image": 3, "seed": 7}
    captioner = load("captioner", cfg, batch_size=4)
    seen = []
    if fixture == "vlm_cfg":
        chat_texts = captioner.generator.chat_texts
        captioner.generator.chat_texts = lambda texts: seen.extend(texts) or chat_texts(texts)
    out = captioner(images)
    prompts = set(load_prompts(prompt_set))
    sampler = PromptSampler(load_prompts(prompt_set), 3, 7)
    for image, captions in zip(images, out, strict=True):
        assert {c.prompt for c in captions} <= set(sampler.sample(image_digest(image))) <= prompts
        assert len({caption_key(c.text) for c in captions}) == len(captions)
    if seen:
        assert len(seen) == 3 * len(images)
    # the same image gets the same prompts and captions in any batch
    alone = load("captioner", cfg, batch_size=1)([images[1]])
    assert [(c.text, c.prompt) for c in alone[0]] == [(c.text, c.prompt) for c in out[1]]


def test_region_captioner_samples_distinct_prompts_per_box(tmp_path, images, load):
    import numpy as np

    cfg = VlmBoxCaptioner.create_tiny(tmp_path) | {"device": "cpu", "prompts": "region", "prompts_per_region": 4}
    captioner = load("region_captioner", cfg, batch_size=5)
    seen = []
    chat_texts = captioner.generator.chat_texts  # every job's prompt goes through it, on either path
    captioner.generator.chat_texts = lambda texts: seen.extend(texts) or chat_texts(texts)
    boxes = [np.array([[2, 3, 30, 40], [10, 10, 20, 20]], np.float32), np.zeros((0, 4), np.float32),
             np.array([[5, 60, 12, 70]], np.float32)]
    out = captioner(images, boxes)
    assert len(seen) == 4 * 3  # 4 prompts for each of the 3 boxes
    per_box = [seen[i:i + 4] for i in range(0, 12, 4)]
    templates = load_prompts("region")
    for prompts in per_box:
        box_text = prompts[0][prompts[0].index("["):prompts[0].index("]") + 1]
        assert len(set(prompts)) == 4 and all(p.replace(box_text, "{box}") in templates for p in prompts)
    recorded = {c.prompt for per_image in out for caps in per_image for c in caps}
    assert recorded <= set(seen) and recorded


def test_region_captioner_skips_a_box_the_centre_crop_removes(tmp_path, load, make_images):
    import numpy as np

    cfg = VlmBoxCaptioner.create_tiny(tmp_path) | {"device": "cpu", "box_format": "plain"}
    captioner = load("region_captioner", cfg)
    seen = []
    chat_texts = captioner.generator.chat_texts
    captioner.generator.chat_texts = lambda texts: seen.extend(texts) or chat_texts(texts)
    (image,) = make_images(sizes=[(128, 32)])  # the 32 px centre crop keeps x 48..80
    out = captioner([image], [np.array([[0, 0, 40, 32], [50, 0, 70, 32]], np.float32)])
    assert out[0][0] == [] and len(seen) == 1
    assert seen[0] == "What is in the region [0.062,0.000,0.688,1.000]? Answer briefly."  # (50 - 48) / 32


def test_paper_config_prompts_build():
    from pathlib import Path

    import annotators
    from data_schemas import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "umg41m.yaml").annotate
    blip2 = annotators.build("captioner", cfg.captioners["blip2"])
    assert len(blip2.prompts.sampler.prompts) == 9 and blip2.prompts.sampler.per_item == 2
    region = annotators.build("region_captioner", cfg.region_captioners["vlm"])
    assert region.box_format.name == "llava-1.5" and region.prompts.sampler.per_item == 5
    assert cfg.min_region_captions == 4
