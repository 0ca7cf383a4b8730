from __future__ import annotations

import pytest
from pydantic import ValidationError

from data_schemas import RLE, ImageRecord, Mask, Region, sanitize_key


def record_kwargs(**overrides):
    base = dict(key="k", source="test", source_id="k.jpg", width=48, height=32, sha256="0" * 64)
    return {**base, **overrides}


def test_sanitize_key_maps_paths_to_safe_keys():
    assert sanitize_key("Train/IMG 001.JPG") == "train_img_001_jpg"
    assert sanitize_key("a/b\\c:d") == "a_b_c_d"
    assert sanitize_key("Ünïcode#1") == "n-code-1"
    with pytest.raises(ValueError, match="no path-safe characters"):
        sanitize_key("///")


def test_record_rejects_unsafe_key():
    with pytest.raises(ValidationError, match="not path-safe"):
        ImageRecord(**record_kwargs(key="../etc/passwd"))


def test_region_rejects_inverted_box():
    with pytest.raises(ValidationError, match="x2<=x1"):
        Region(id=0, box_xyxy=(10, 0, 5, 5), label="x", annotator="gt")


def test_record_rejects_box_outside_and_wrong_mask_size():
    inside = Region(id=0, box_xyxy=(0, 0, 48, 32), label="x", annotator="gt")
    ImageRecord(**record_kwargs(regions=[inside]))
    outside = inside.model_copy(update={"box_xyxy": (0, 0, 49, 32)})
    with pytest.raises(ValidationError, match="outside image 48x32"):
        ImageRecord(**record_kwargs(regions=[outside]))
    bad_mask = inside.model_copy(update={"mask": Mask(rle=RLE(size=(48, 32), counts="x"), annotator="sam")})
    with pytest.raises(ValidationError, match=r"mask size \[48, 32\] != \[h, w\] \[32, 48\]"):
        ImageRecord(**record_kwargs(regions=[bad_mask]))


def test_record_rejects_duplicate_region_ids_and_unknown_fields():
    region = Region(id=3, box_xyxy=(0, 0, 4, 4), label="x", annotator="gt")
    with pytest.raises(ValidationError, match="duplicate region ids"):
        ImageRecord(**record_kwargs(regions=[region, region]))
    with pytest.raises(ValidationError, match="extra"):
        ImageRecord(**record_kwargs(colour="red"))


def test_best_caption_prefers_highest_kept_score(record_factory):
    record, _ = record_factory("k")
    assert record.best_caption() == "best k"
    assert record.model_copy(update={"captions": []}).best_caption() == ""
