"""Prompt sets for the captioners and their deterministic per-image / per-region sampling (paper App. D).

The paper prompts BLIP-2 with 9 prompts and Shikra with 274 image-caption prompts, and region captioners
with 5, so the captions of one image vary in phrasing. The built-in sets here are ours, in that style
(one prompt per line, ``#`` comments):

- ``blip2_image`` (9): prefix prompts BLIP-2 continues;
- ``shikra_image`` (274): chat prompts for Shikra-style VLMs;
- ``region`` (5): region prompts with a ``{box}`` placeholder (the ``vlm-box`` region captioner);
- ``gpt4roi_region`` (5): GPT4RoI's own region-caption training questions with a ``{region}`` placeholder.

A backend's ``prompts`` key takes a set name, a text file of the same format, or a list. ``PromptSampler``
draws ``k`` distinct prompts per image (or per region) from a seed and the image's own content, so the same
image gets the same prompts in any batch, on any worker, after a resume. ``caption_key`` is the normalised
text captions are de-duplicated on (within a captioner and across captioners).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from annotators.base import AnnotatorError

PROMPTS_DIR = Path(__file__).parent
BUILTIN_SETS = ("blip2_image", "gpt4roi_region", "region", "shikra_image")


def read_prompt_file(path: str | Path) -> list[str]:
    """Non-empty, non-comment lines of a prompt file, stripped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise AnnotatorError(f"cannot read prompt file {path}: {exc}") from exc
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def load_prompts(spec: str | Sequence[str], placeholder: str | None = None) -> list[str]:
    """A prompt set: a built-in name (``BUILTIN_SETS``), a prompt file path, or the prompts themselves.

    Raises:
        AnnotatorError: an empty set, duplicate prompts, or (with ``placeholder``, e.g. ``"{box}"``) a prompt
            without it.
    """
    if isinstance(spec, str):
        prompts = read_prompt_file(PROMPTS_DIR / f"{spec}.txt" if spec in BUILTIN_SETS else spec)
        origin = spec
    else:
        prompts, origin = [str(p).strip() for p in spec], "the prompt list"
    if not prompts or any(not p for p in prompts):
        raise AnnotatorError(f"{origin}: prompts must be non-empty strings, got {prompts!r}")
    if len(set(prompts)) != len(prompts):
        raise AnnotatorError(f"{origin}: duplicate prompts")
    if placeholder is not None:
        missing = [p for p in prompts if placeholder not in p]
        if missing:
            raise AnnotatorError(f"{origin}: prompts need a '{placeholder}' placeholder: {missing[:3]}")
    return prompts


def image_digest(image: Image.Image) -> bytes:
    """A cheap content key of an image: its size and a 16 x 16 grey thumbnail (same pixels, same key)."""
    thumb = image.convert("L").resize((16, 16), Image.Resampling.BILINEAR)
    return hashlib.blake2b(f"{image.size}".encode() + thumb.tobytes(), digest_size=16).digest()


class PromptSampler:
    """``k`` distinct prompts per item, drawn from ``prompts`` by a seed and the item's key."""

    def __init__(self, prompts: Sequence[str], per_item: int = 1, seed: int = 0) -> None:
        if not 1 <= per_item <= len(prompts):
            raise AnnotatorError(f"prompts per item must be in 1..{len(prompts)} (the set's size), got {per_item}")
        self.prompts, self.per_item, self.seed = list(prompts), int(per_item), int(seed)

    def sample(self, *key: bytes | str | int | float) -> list[str]:
        """The prompts of the item identified by ``key`` (e.g. an image digest, a box), in drawing order."""
        digest = hashlib.blake2b(repr((self.seed, *key)).encode(), digest_size=8).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "little"))
        picks = rng.choice(len(self.prompts), size=self.per_item, replace=False)
        return [self.prompts[i] for i in picks]


_PUNCT = re.compile(r"[^\w\s]")


def caption_key(text: str) -> str:
    """What two captions must share to count as one: lower case, no punctuation, single spaces."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


class PromptChoice:
    """A backend's prompt settings: one fixed prompt, or ``per_item`` prompts sampled from a set.

    Args:
        prompt: the fixed prompt (None: ``default``); not together with ``prompts``.
        prompts: a prompt set (``load_prompts``) to sample from, or None.
        per_item: prompts per image / region when sampling (each answered separately).
        seed: the sampling seed.
        default: the fixed prompt when neither is given.
        placeholder: text every prompt must contain (``"{box}"`` for region prompts).
    """

    def __init__(self, prompt: str | None, prompts: str | Sequence[str] | None, per_item: int, seed: int,
                 default: str, placeholder: str | None = None) -> None:
        if prompt is not None and prompts is not None:
            raise AnnotatorError("give either 'prompt' (one fixed prompt) or 'prompts' (a set to sample from)")
        if prompts is None and per_item != 1:
            raise AnnotatorError(f"{per_item} prompts per item need a 'prompts' set to sample from")
        self.sampler = None if prompts is None else PromptSampler(load_prompts(prompts, placeholder), per_item, seed)
        self.prompt = default if prompt is None else prompt
        if self.sampler is None and placeholder is not None and placeholder not in self.prompt:
            raise AnnotatorError(f"prompt {self.prompt!r} needs a '{placeholder}' placeholder")

    def for_item(self, *key: bytes | str | int | float) -> list[str]:
        """The prompts of one image / region (``key`` identifies it; unused for a fixed prompt)."""
        return self.sampler.sample(*key) if self.sampler is not None else [self.prompt]
