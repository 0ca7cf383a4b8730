"""``pipeline.storage``: which locations are local, URL confinement, a clear error for an unknown protocol."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from pipeline.storage import StorageError, as_path, inside, is_local, is_url, names_in


def test_plain_paths_and_file_urls_are_local_paths():
    assert as_path("/data/x") == Path("/data/x") and as_path("file:///data/x") == Path("/data/x")
    assert as_path(Path("rel")) == Path("rel") and is_local(as_path("rel/dir"))
    assert not is_url("/data/x") and not is_url("file:///x") and is_url("s3://b/x") and is_url("gs://b/x")


def test_s3_urls_keep_their_double_slash_and_join_like_paths():
    root = as_path("s3://bucket/in/")
    assert str(root) == "s3://bucket/in" and not is_local(root)
    assert str(root / "a" / "b.jpg") == "s3://bucket/in/a/b.jpg"


@pytest.mark.parametrize(("key", "ok"), [("in/a.jpg", True), ("in/sub/b.jpg", True), ("in/../x.jpg", False),
                                         ("in/./a.jpg", False), ("in//a.jpg", False), ("in-other/a.jpg", False),
                                         ("in", False)])
def test_inside_accepts_plain_keys_under_the_prefix_only(key, ok):
    assert inside(as_path(f"s3://bucket/{key}"), as_path("s3://bucket/in")) is ok


def test_an_unknown_protocol_is_a_storage_error_naming_the_package(tmp_path):
    with pytest.raises(StorageError, match="no filesystem for foo://"):
        as_path("foo://bucket/x")
    result = CliRunner().invoke(app, ["validate", "foo://bucket/x"])
    assert result.exit_code == 2 and result.output.startswith("error: foo://bucket/x: no filesystem")


def test_names_in_lists_one_level_and_a_missing_folder_as_empty(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("x")
    assert names_in(tmp_path) == ["a.txt", "sub"] and names_in(tmp_path / "missing") == []
