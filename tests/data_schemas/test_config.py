from __future__ import annotations

import pytest

from data_schemas import BuildConfig, ConfigError, load_config


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("shard_size: 32\nimages:\n  max_pixels: 1000\n")
    cfg = load_config(path, ["images.max_side=99", "source.kind=coco"])
    assert isinstance(cfg, BuildConfig)
    assert (cfg.shard_size, cfg.images.max_pixels, cfg.images.max_side, cfg.source.kind) == (32, 1000, 99, "coco")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("shard_size: 0\n", r"shard_size: Input should be greater than 0"),
        ("images:\n  max_pixelz: 3\n", r"images\.max_pixelz: Extra inputs are not permitted"),
        ("source:\n  kind: ftp\n", r"source\.kind: Input should be 'auto', 'folder'"),
        ("- a\n- b\n", r"top level must be a mapping"),
        ("a: [1,\n", r"not valid YAML"),
        ("annotate:\n  stability: {offsets: [2, 4]}\n", r"annotate\.stability: Value error, stability\.offsets "
         r"\(fixed pixels\) was replaced by diagonal_fractions"),
        ("annotate:\n  stability: {diagonal_fractions: [0.1, 2]}\n",
         r"annotate\.stability\.diagonal_fractions\.1: Input should be less than 1"),
    ],
)
def test_errors_name_the_bad_field_and_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert "bad.yaml" in str(info.value)


def test_yaml_tags_are_not_executed(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("shard_size: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_missing_file_and_malformed_override():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/x.yaml")
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["shard_size"])


def test_sections_of_a_project_config(tmp_path):
    path = tmp_path / "project.yaml"
    path.write_text("build:\n  shard_size: 8\ntrain:\n  steps: 3\n")
    assert load_config(path).shard_size == 8
    with pytest.raises(ConfigError, match=r"project.yaml \[build\]: shard_size: Input should be greater"):
        load_config(path, ["shard_size=0"])
