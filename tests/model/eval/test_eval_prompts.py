"""Prompt-ensembled class embeddings and the built-in templates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.eval.prompts import DEFAULT_TEMPLATES, class_text_embeddings, fill_templates
from model.factory import create_umg_clip, get_tokenizer
from pipeline.sample_data import templates as sample_templates
from pipeline.sample_data.eval_formats import EVAL_TEMPLATES


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_umg_clip("umg-tiny-vit").eval()


def test_embeddings_are_the_normalised_mean_of_the_template_embeddings(vit):
    tok = get_tokenizer("umg-tiny-vit")
    templates = ["a photo of a {}", "{}"]
    out = class_text_embeddings(vit, tok, ["eight", "three"], templates)
    with torch.no_grad():
        manual = [F.normalize(vit.encode_text(tok(fill_templates(name, templates))).mean(0), dim=-1)
                  for name in ("eight", "three")]
    assert out.shape == (2, 64) and torch.allclose(out, torch.stack(manual), atol=1e-6)
    assert fill_templates("eight", templates) == ["a photo of a eight", "eight"]  # verbatim, as clip_benchmark
    assert class_text_embeddings(vit, tok, ["eight"]).shape == (1, 64)  # built-in templates
    with pytest.raises(ValueError, match="without"):
        class_text_embeddings(vit, tok, ["eight"], ["a photo"])


def test_builtin_templates_hold_the_article_free_digit_scene_prompts():
    """Prompts are not rewritten, so the built-in and shipped digit prompts are the captions' article-free forms."""
    assert set(EVAL_TEMPLATES) <= set(DEFAULT_TEMPLATES)
    digit_prompts = {t.replace("{digit}", "{}") for t in sample_templates.ZERO_SHOT_PROMPTS}
    assert set(EVAL_TEMPLATES) <= digit_prompts
    for word in sample_templates.DIGIT_WORDS:
        for template in EVAL_TEMPLATES:
            text = template.replace("{}", word)
            assert sample_templates.fix_articles(text) == text
