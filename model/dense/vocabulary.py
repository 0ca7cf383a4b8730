"""Open-vocabulary class texts the FC-CLIP way: ViLD prompt templates and synonyms ("building, edifice").

FC-CLIP (``fcclip/fcclip.py``, ``prepare_class_names_from_metadata`` + ``get_classification_logits``) splits
each class name at commas into synonyms, embeds every synonym with the 14 ViLD templates (normalised
template embeddings averaged and renormalised, per synonym) and scores a class by the **max** over its
synonyms' logits (OpenSeg / ODISE's max ensemble).

Here a vocabulary of C classes with at most K synonyms is a (C, K, E) tensor; a class with fewer synonyms
repeats its first one, which leaves the max unchanged, so no mask is needed. (C, E) is the one-synonym
case and is accepted everywhere too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from model.eval.prompts import class_text_embeddings

VILD_TEMPLATES: tuple[str, ...] = (  # FC-CLIP's VILD_PROMPT, verbatim
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)


def split_synonyms(classname: str) -> list[str]:
    """FC-CLIP's ``split_labels``: "building, edifice" -> ["building", "edifice"] (", " and "," both split)."""
    names = [n for n in classname.replace(", ", ",").split(",") if n]
    if not names:
        raise ValueError(f"class name {classname!r} has no synonym")
    return names


@torch.no_grad()
def synonym_text_embeddings(umg, tokenizer: Callable, classnames: Sequence[str],
                            templates: Sequence[str] | None = None) -> torch.Tensor:
    """(C, K, E) prompt-ensembled embeddings of every class's synonyms (K = most synonyms of a class;
    shorter lists repeat their first synonym). ``templates`` None = :data:`VILD_TEMPLATES`."""
    synonyms = [split_synonyms(name) for name in classnames]
    width = max(len(s) for s in synonyms)
    flat = [name for names in synonyms for name in names]
    emb = class_text_embeddings(umg, tokenizer, flat, list(VILD_TEMPLATES if templates is None else templates))
    rows, start = [], 0
    for names in synonyms:
        block = emb[start:start + len(names)]
        start += len(names)
        rows.append(torch.cat([block, block[:1].expand(width - len(names), -1)]))
    return torch.stack(rows)


def as_synonyms(text_emb: torch.Tensor) -> torch.Tensor:
    """(C, E) -> (C, 1, E); (C, K, E) unchanged."""
    if text_emb.ndim == 2:
        return text_emb[:, None]
    if text_emb.ndim == 3:
        return text_emb
    raise ValueError(f"class text embeddings must be (C, E) or (C, K, E), got {tuple(text_emb.shape)}")


def class_logits(features: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Cosine of normalised ``features`` (..., E) with every class: the max over its synonyms -> (..., C).

    ``text_emb``: (C, E) or (C, K, E) normalised (:func:`synonym_text_embeddings`).
    """
    per_synonym = torch.einsum("...e,cke->...ck", features, as_synonyms(text_emb).to(features.dtype))
    return per_synonym.amax(dim=-1)
