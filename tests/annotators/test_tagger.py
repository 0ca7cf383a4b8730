"""Taggers: ``clip-vocab`` through a tiny random open_clip checkpoint; ``ram`` only its missing-package error."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import annotators
from annotators import AnnotatorError, MissingDependencyError
from annotators.tagger import DEFAULT_VOCAB, ClipVocabTagger, read_vocab
from data_schemas import Tag


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory) -> dict:
    return ClipVocabTagger.create_tiny(tmp_path_factory.mktemp("tiny_clip")) | {"device": "cpu"}


@pytest.fixture(scope="module")
def tagger(tiny_cfg, load):
    return load("tagger", tiny_cfg, threshold=0.0, top_k=5, batch_size=3)


def test_default_vocab_has_coco_ade_and_sample_words():
    tags = read_vocab(DEFAULT_VOCAB)
    assert len(tags) == len(set(tags)) == 236
    for word in ("person", "traffic light", "chest of drawers", "three", "purple", "coffee", "astronaut"):
        assert word in tags


def test_tags_per_image_schema_and_order(tagger, images):
    out = tagger(images)
    assert len(out) == 3
    vocab = set(read_vocab(DEFAULT_VOCAB))
    for tags in out:
        assert len(tags) == 5
        assert all(isinstance(t, Tag) and t.annotator == "clip-vocab" and t.name in vocab for t in tags)
        assert all(0.0 <= t.score <= 1.0 for t in tags)
        assert [t.score for t in tags] == sorted((t.score for t in tags), reverse=True)
        Tag.model_validate(tags[0].model_dump())
    assert tagger.version.startswith("umg-tiny-clip:") and tagger.kind == "tagger" and tagger.name == "clip-vocab"


def test_empty_batch(tagger):
    assert tagger([]) == []


def test_batched_equals_one_by_one(tiny_cfg, tagger, images, load):
    one = load("tagger", tiny_cfg, threshold=0.0, top_k=5, batch_size=1)
    batched, single = tagger(images), one(images)
    for a, b in zip(batched, single, strict=True):
        assert [t.name for t in a] == [t.name for t in b]
        np.testing.assert_allclose([t.score for t in a], [t.score for t in b], atol=1e-5)


def test_score_is_mapped_cosine_with_prompt(tagger, images):
    tags = tagger(images[:1])[0]
    prompts = [tagger.prompt.format(tag=t.name) for t in tags]
    image_feat = tagger.encoder.encode_images(images[:1], 1)
    cos = (tagger.encoder.encode_texts(prompts, 8) @ image_feat[0]).numpy()
    np.testing.assert_allclose([t.score for t in tags], (cos + 1) / 2, atol=1e-5)


def test_threshold_and_custom_vocab(tiny_cfg, images, tmp_path, load):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("# digits\nthree\n\nseven\nthree\n", encoding="utf-8")
    tagger = load("tagger", tiny_cfg, vocab=str(vocab), threshold=0.0, top_k=10)
    assert tagger.tags == ["three", "seven"]
    assert all(len(tags) == 2 for tags in tagger(images))
    strict = load("tagger", tiny_cfg, vocab=str(vocab), threshold=1.0)
    assert strict(images) == [[], [], []]


def test_unknown_and_missing_keys(tiny_cfg):
    with pytest.raises(AnnotatorError, match=r"unknown config keys \['topk'\]"):
        annotators.build("tagger", {**tiny_cfg, "topk": 3})
    with pytest.raises(AnnotatorError, match=r"missing required config keys \['model'\]"):
        annotators.build("tagger", {"backend": "clip-vocab"})
    with pytest.raises(AnnotatorError, match="placeholder"):
        annotators.build("tagger", {**tiny_cfg, "prompt": "a photo"})


def test_missing_files_name_the_path(tiny_cfg, tmp_path, load):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(AnnotatorError, match=str(missing)):
        load("tagger", tiny_cfg, pretrained=str(missing))
    with pytest.raises(AnnotatorError, match="vocab.txt"):
        load("tagger", tiny_cfg, vocab=str(tmp_path / "vocab.txt"))
    with pytest.raises(AnnotatorError, match="no_such_tag"):
        load("tagger", tiny_cfg, pretrained="no_such_tag")


def test_call_before_load_is_an_error(tiny_cfg, images):
    with pytest.raises(AnnotatorError, match="load"):
        annotators.build("tagger", tiny_cfg)(images)


@pytest.mark.skipif(importlib.util.find_spec("ram") is not None, reason="recognize-anything is installed")
def test_ram_missing_package_names_the_docker_image(tmp_path):
    tagger = annotators.build("tagger", {"backend": "ram", "checkpoint": str(tmp_path / "ram_plus.pth")})
    with pytest.raises(MissingDependencyError, match="docker/Dockerfile.cuda"):
        tagger.load()
    with pytest.raises(MissingDependencyError, match="recognize-anything"):
        type(tagger).create_tiny(tmp_path)


def test_ram_config_errors():
    with pytest.raises(AnnotatorError, match="checkpoint"):
        annotators.build("tagger", {"backend": "ram"})
    with pytest.raises(AnnotatorError, match="variant"):
        annotators.build("tagger", {"backend": "ram", "checkpoint": "x.pth", "variant": "tag2text"})
