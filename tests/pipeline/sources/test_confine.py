"""pipeline.sources.confine: reads stay under the root, regular files only, capped before reading."""

from __future__ import annotations

import os

import pytest

from pipeline.sources.confine import ReadPolicy, RefusedRead, read_confined


@pytest.fixture
def tree(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "ok.bin").write_bytes(b"inside")
    (outside / "secret.bin").write_bytes(b"secret")
    (root / "out_link.bin").symlink_to(outside / "secret.bin")
    (root / "in_link.bin").symlink_to(root / "ok.bin")
    (root / "loop.bin").symlink_to(root / "loop.bin")
    os.mkfifo(root / "fifo.bin")
    (root / "zero.bin").symlink_to("/dev/zero")
    return root, outside


def _refusal(path, root, policy=ReadPolicy(), cap=100) -> str:
    with pytest.raises(RefusedRead) as info:
        read_confined(path, root, policy, cap)
    return info.value.reason


def test_regular_files_under_the_root_are_read_links_inside_too(tree) -> None:
    root, _ = tree
    assert read_confined(root / "ok.bin", root, ReadPolicy(), 100) == b"inside"
    assert read_confined(root / "in_link.bin", root, ReadPolicy(), 100) == b"inside"


def test_links_out_of_the_root_fifos_devices_loops_and_escapes_are_refused(tree) -> None:
    root, outside = tree
    assert _refusal(root / "out_link.bin", root).startswith(f"outside_root: {root / 'out_link.bin'} resolves to ")
    assert _refusal(root / ".." / "outside" / "secret.bin", root).startswith("outside_root: ")
    assert _refusal(outside / "secret.bin", root).startswith("outside_root: ")  # an absolute name
    assert _refusal(root / "fifo.bin", root) == f"not_a_regular_file: {root / 'fifo.bin'} is a FIFO"  # no hang
    assert _refusal(root / "zero.bin", root).startswith("outside_root: ")
    assert _refusal(root / "zero.bin", root, ReadPolicy.create(follow_symlinks=["/dev"])) == (
        f"not_a_regular_file: {root / 'zero.bin'} is a character device")
    assert _refusal(root / "loop.bin", root).startswith("unreadable: ")
    assert _refusal(root / "gone.bin", root) == f"missing_image: {root / 'gone.bin'}"
    assert _refusal(root, root) == f"not_a_regular_file: {root} is a directory"


def test_follow_symlinks_widens_the_root_to_named_folders_only(tree) -> None:
    root, outside = tree
    assert read_confined(root / "out_link.bin", root, ReadPolicy.create(follow_symlinks=[outside]), 100) == b"secret"
    other = outside.parent / "other"
    other.mkdir()
    assert _refusal(root / "out_link.bin", root, ReadPolicy.create(follow_symlinks=[other])).startswith("outside_root")


def test_size_cap_is_checked_before_reading(tree) -> None:
    root, _ = tree
    assert _refusal(root / "ok.bin", root, cap=5) == (
        f"too_large: {root / 'ok.bin'} is 6 bytes, over source.max_image_bytes=5")
    assert RefusedRead("too_large: x").tag == "too_large"


def test_a_read_reserves_the_file_size_not_the_cap(tree) -> None:
    """Issue 20 class 6: ``read(cap + 1)`` reserved 256 MiB per file whatever its size (MemoryError on resume
    under a memory limit). A 6-byte file read with the default cap allocates about its size."""
    import tracemalloc

    root, _ = tree
    tracemalloc.start()
    try:
        assert read_confined(root / "ok.bin", root, ReadPolicy(), 256 * 2**20) == b"inside"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"reading a 6-byte file allocated {peak} bytes"
