"""Caption and tag templates of the digit scenes, as data (see docs/sample_data.md).

A text encoder trained from scratch only understands phrasings it has seen, so the captions include
the bare class forms that zero-shot evaluation prompts use (``ZERO_SHOT_PROMPTS``). Templates are
plain ``str.format`` strings written with "a"; ``fix_articles`` turns "a eight" into "an eight" —
evaluation code must run its prompts through it too, so train and eval text match exactly.

Fields: ``{digit}`` digit word, ``{color}`` colour word, ``{background}`` background label,
``{count}`` count word, ``{noun}`` "digit"/"digits", ``{listing}`` "a red three and a blue seven".
A background of ``None`` (``SampleConfig.name_background = False``) drops every template with
``{background}`` and the background tag: no caption or tag then names the background.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# Image captions, filled once per digit instance (duplicates removed).
IMAGE_DIGIT_TEMPLATES: tuple[str, ...] = (
    "{digit}",
    "a photo of a {digit}",
    "a handwritten {digit}",
    "a {color} {digit}",
    "a photo of a {color} {digit}",
    "a {digit} on a {background} background",
)

# Image captions about the whole scene; digits are listed left to right. The first one is the fullest
# description and comes first in the caption list (an unscored record's ``txt`` is its first caption).
IMAGE_SCENE_TEMPLATES: tuple[str, ...] = (
    "{listing} on a {background} background",
    "a photo of {listing}",
    "{count} {noun}: {listing}",
    "{count} {noun} on a {background} background",
    "a photo of {count} handwritten {noun} on a {background} background",
    "a {background} background",
)

# Region captions, filled for each digit instance (its box / mask).
REGION_TEMPLATES: tuple[str, ...] = (
    "{digit}",
    "a {digit}",
    "a photo of a {digit}",
    "a handwritten {digit}",
    "the digit {digit}",
    "a {color} {digit}",
    "a {color} digit {digit}",
    "a {color} handwritten {digit}",
    "a {color} {digit} on a {background} background",
)

# Prompts the zero-shot evaluations are expected to use; every one appears verbatim in training captions.
ZERO_SHOT_PROMPTS: tuple[str, ...] = ("a photo of a {digit}", "{digit}", "a handwritten {digit}")
REGION_PROMPTS: tuple[str, ...] = ("a photo of a {digit}", "{digit}", "a {digit}")
COLOR_PROMPTS: tuple[str, ...] = ("a {color} {digit}",)
BACKGROUND_PROMPTS: tuple[str, ...] = ("a {background} background",)

_A_BEFORE_VOWEL = re.compile(r"\b([Aa]) (?=(?!one\b)[aeiouAEIOU])")


def fix_articles(text: str) -> str:
    """Use "an" before a vowel sound: "a eight" -> "an eight", "a orange one" -> "an orange one"."""
    return _A_BEFORE_VOWEL.sub(lambda m: "an " if m.group(1) == "a" else "An ", text)


def digit_word(digit: int) -> str:
    """``3 -> "three"``."""
    return DIGIT_WORDS[digit]


def count_word(count: int) -> str:
    """``2 -> "two"``; counts past ten stay numerals."""
    return COUNT_WORDS[count] if 0 <= count < len(COUNT_WORDS) else str(count)


def join_listing(phrases: Sequence[str]) -> str:
    """``["a", "b", "c"] -> "a, b and c"``."""
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _unique(texts: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(fix_articles(t) for t in texts))


def fill(templates: Iterable[str], **fields: str | None) -> list[str]:
    """Format every template with ``fields``, fix articles, drop duplicates (first occurrence kept).

    Templates using a field whose value is ``None`` are skipped.
    """
    absent = [f"{{{name}}}" for name, value in fields.items() if value is None]
    return _unique(t.format(**fields) for t in templates if not any(a in t for a in absent))


def image_captions(instances: Sequence[tuple[int, str]], background: str | None) -> list[str]:
    """All captions of one scene.

    Args:
        instances: ``(digit, colour)`` of each digit in the image, ordered left to right.
        background: the background label, e.g. ``"coffee"``; ``None``: no caption names it.
    Returns:
        distinct captions, the scene forms first (fullest first), then the per-digit forms.
    """
    listing = join_listing([f"a {color} {digit_word(digit)}" for digit, color in instances])
    scene = {
        "count": count_word(len(instances)),
        "noun": "digit" if len(instances) == 1 else "digits",
        "listing": listing,
        "background": background,
    }
    texts = fill([t for t in IMAGE_SCENE_TEMPLATES if instances or "{listing}" not in t], **scene)
    for digit, color in instances:
        texts += fill(IMAGE_DIGIT_TEMPLATES, digit=digit_word(digit), color=color, background=background)
    return _unique(texts)


def region_captions(digit: int, color: str, background: str | None) -> list[str]:
    """All distinct captions of one digit region."""
    return fill(REGION_TEMPLATES, digit=digit_word(digit), color=color, background=background)


def image_tags(instances: Sequence[tuple[int, str]], background: str | None) -> list[str]:
    """Digit words (ascending digit), colour words (alphabetical), then the background label (if named)."""
    digits = [digit_word(d) for d in sorted({d for d, _ in instances})]
    colors = sorted({c for _, c in instances})
    return [*digits, *colors, *([background] if background is not None else [])]


def region_tags(digit: int, color: str) -> list[str]:
    """``[digit word, colour word]``."""
    return [digit_word(digit), color]
