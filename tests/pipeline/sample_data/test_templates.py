"""Caption and tag templates: the eval prompts must appear verbatim in training captions."""

from __future__ import annotations

import pytest

from pipeline.sample_data import templates as T


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a photo of a eight", "a photo of an eight"),
        ("a orange three", "an orange three"),
        ("a one", "a one"),
        ("a three on a astronaut background", "a three on an astronaut background"),
        ("A eight", "An eight"),
        ("a red digit eight", "a red digit eight"),
        ("coffea eight", "coffea eight"),
    ],
)
def test_fix_articles(text, expected):
    assert T.fix_articles(text) == expected


def test_join_listing():
    assert T.join_listing([]) == ""
    assert T.join_listing(["a red three"]) == "a red three"
    assert T.join_listing(["x", "y"]) == "x and y"
    assert T.join_listing(["x", "y", "z"]) == "x, y and z"


def test_image_captions_hold_bare_class_and_counting_forms():
    captions = T.image_captions([(3, "red"), (7, "blue")], "coffee")
    for expected in [
        "a photo of a three",
        "three",
        "a red three",
        "a three on a coffee background",
        "a photo of a seven",
        "a blue seven",
        "two digits: a red three and a blue seven",
        "two digits on a coffee background",
        "a coffee background",
    ]:
        assert expected in captions
    assert len(captions) == len(set(captions)) >= 7
    assert captions[0] == "a red three and a blue seven on a coffee background"


def test_single_digit_captions_are_many_distinct_and_grammatical():
    captions = T.image_captions([(8, "orange")], "astronaut")
    assert len(set(captions)) >= 7
    assert "an orange eight" in captions
    assert "a photo of an eight" in captions
    assert "one digit: an orange eight" in captions
    assert "one digit on an astronaut background" in captions
    assert not any(" a eight" in c or " a orange" in c or c.startswith("a eight") for c in captions)


def test_repeated_digits_are_deduplicated_but_listed():
    captions = T.image_captions([(1, "red"), (1, "red")], "moon")
    assert len(captions) == len(set(captions))
    assert "two digits: a red one and a red one" in captions


def test_region_captions_have_four_or_more_distinct():
    captions = T.region_captions(3, "red", "coffee")
    assert len(captions) == len(set(captions)) >= 4
    assert {"three", "a red three", "a photo of a three", "a handwritten three", "a red digit three"} <= set(captions)


@pytest.mark.parametrize("digit", range(10))
def test_eval_prompts_are_in_distribution(digit):
    word = T.digit_word(digit)
    image_captions = set(T.image_captions([(digit, "green")], "brick"))
    region_captions = set(T.region_captions(digit, "green", "brick"))
    assert set(T.fill(T.ZERO_SHOT_PROMPTS, digit=word)) <= image_captions
    assert set(T.fill(T.REGION_PROMPTS, digit=word)) <= region_captions
    assert set(T.fill(T.COLOR_PROMPTS, digit=word, color="green")) <= image_captions & region_captions
    assert set(T.fill(T.BACKGROUND_PROMPTS, background="brick")) <= image_captions


def test_tags():
    instances = [(7, "red"), (3, "blue"), (7, "green")]
    assert T.image_tags(instances, "coffee") == ["three", "seven", "blue", "green", "red", "coffee"]
    assert T.region_tags(3, "red") == ["three", "red"]


def test_count_word():
    assert T.count_word(3) == "three"
    assert T.count_word(12) == "12"


def test_unnamed_background_drops_its_templates_and_tag():
    named = T.image_captions([(3, "red")], "coffee")
    unnamed = T.image_captions([(3, "red")], None)
    assert unnamed == [c for c in named if "coffee" not in c] and unnamed
    assert T.region_captions(3, "red", None) == [c for c in T.region_captions(3, "red", "coffee") if "coffee" not in c]
    assert T.image_tags([(3, "red")], None) == ["three", "red"] == T.image_tags([(3, "red")], "coffee")[:-1]
