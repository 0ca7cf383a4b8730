"""Prompt-ensembled class text embeddings (CLIP's zero-shot classifier, paper Tab. 2 protocol).

Each class name is put into every template, the template embeddings are L2-normalised, averaged and
normalised again (Radford et al. 2021; open_clip ``build_zero_shot_classifier``).

A prompt is the template with ``{}`` replaced by the class name and nothing else: no article is rewritten
("a photo of a {}." with "eagle" stays "a photo of a eagle."), exactly as clip_benchmark's
``template.format(c=classname)`` (its templates spell the slot ``{c}``; ours ``{}``). The digit-scene
evaluation sets therefore ship prompts that need no article (``templates.txt``: "{}", "a handwritten {}",
``pipeline.sample_data.eval_formats.EVAL_TEMPLATES``).

``DEFAULT_TEMPLATES`` are the built-in prompts, used when a data set brings no ``templates.txt``: the
article-free forms of the digit-scene captions plus the first CLIP/ImageNet prompts ("a photo of a {}.",
"a photo of the {}."). For real benchmarks pass the dataset's own templates (clip_benchmark's per-dataset
lists) with ``--templates``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from model.eval.features import encode_texts

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "{}",
    "a handwritten {}",
    "a photo of a {}.",
    "a photo of the {}.",
)


def fill_templates(classname: str, templates: Sequence[str]) -> list[str]:
    """Each template with ``{}`` replaced by the class name, verbatim (clip_benchmark's rule)."""
    return [t.replace("{}", classname) for t in templates]


@torch.no_grad()
def class_text_embeddings(umg, tokenizer: Callable, classnames: Sequence[str],
                          templates: Sequence[str] | None = None, batch_size: int = 256) -> torch.Tensor:
    """Prompt-ensembled class embeddings.

    Args:
        umg: a ``UMGCLIP`` (anything with ``encode_text(tokens) -> (T, E)`` normalised).
        tokenizer: list[str] -> (T, L) token ids.
        classnames: C names.
        templates: prompts with ``{}`` for the name; None = :data:`DEFAULT_TEMPLATES`.
        batch_size: prompts per text-tower call.

    Returns:
        (C, E) float32 L2-normalised mean of the C x len(templates) prompt embeddings, on the model's
        device.
    """
    templates = list(DEFAULT_TEMPLATES if templates is None else templates)
    if not templates or not classnames:
        raise ValueError("need at least one class name and one template")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"templates without '{{}}' for the class name: {bad}")
    prompts = [p for name in classnames for p in fill_templates(name, templates)]
    emb = encode_texts(umg, tokenizer, prompts, batch_size)
    emb = F.normalize(emb, dim=-1).view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1).to(next(umg.parameters()).device)
