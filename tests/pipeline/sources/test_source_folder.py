"""pipeline.sources.folder.FolderSource: listing, keys, sidecar captions, bad inputs."""

from __future__ import annotations

import os

from data_schemas import KEY_PATTERN
from pipeline.sources.base import Source
from pipeline.sources.confine import ReadPolicy
from pipeline.sources.folder import FolderSource, decode_text, item_key


def build_tree(root, image_bytes) -> dict[str, bytes]:
    files = {
        "a.jpg": image_bytes("JPEG"),
        "sub/B.PNG": image_bytes("PNG"),
        "sub/deep/c.webp": image_bytes("WEBP"),
        "zero.jpeg": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "a.txt").write_text("  a red cat\n", encoding="utf-8")
    (root / "sub" / "B.txt").write_bytes(b"caf\xe9 au lait")  # latin-1, not UTF-8
    (root / "readme.md").write_text("not an image")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.jpg").write_bytes(image_bytes())
    (root / "._a.jpg").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork
    return files


def test_lists_images_recursively_sorted_and_stable(tmp_path, image_bytes) -> None:
    build_tree(tmp_path, image_bytes)
    source = FolderSource(tmp_path)
    assert isinstance(source, Source) and source.kind == "folder"
    refs = source.list_refs()
    # Hidden files are inputs too (the macOS fork becomes a not_an_image row); hidden folders are not walked.
    assert refs == ["._a.jpg", "a.jpg", "sub/B.PNG", "sub/deep/c.webp", "zero.jpeg"]
    assert FolderSource(tmp_path).list_refs() == refs


def test_reads_bytes_keys_and_sidecar_captions(tmp_path, image_bytes) -> None:
    files = build_tree(tmp_path, image_bytes)
    items = list(FolderSource(tmp_path).read(["a.jpg", "sub/B.PNG", "sub/deep/c.webp"]))
    assert [i.key for i in items] == ["a", "sub_b", "sub_deep_c"]
    assert [i.source_id for i in items] == ["a.jpg", "sub/B.PNG", "sub/deep/c.webp"]
    assert [i.image_bytes for i in items] == [files["a.jpg"], files["sub/B.PNG"], files["sub/deep/c.webp"]]
    assert all(i.error is None for i in items)
    a, b, c = (i.known for i in items)
    assert [(cap.text, cap.annotator) for cap in a.captions] == [("a red cat", "alt_text")]
    assert a.notes == []
    assert [cap.text for cap in b.captions] == ["caf\ufffd au lait"]
    assert b.notes == ["not_utf8: B.txt: invalid bytes replaced"]
    assert c.captions == [] and c.regions == []


def test_zero_byte_file_is_passed_on_for_decode_to_reject(tmp_path, image_bytes) -> None:
    build_tree(tmp_path, image_bytes)
    (item,) = FolderSource(tmp_path).read(["zero.jpeg"])
    assert item.image_bytes == b"" and item.error is None


def test_missing_and_unreadable_become_error_items_in_order(tmp_path, image_bytes) -> None:
    build_tree(tmp_path, image_bytes)
    (tmp_path / "dir.jpg").mkdir()
    refs = ["a.jpg", "gone.jpg", "dir.jpg", "sub/B.PNG"]
    items = list(FolderSource(tmp_path).read(refs))
    assert [i.source_id for i in items] == refs
    assert items[1].error == f"missing_image: {tmp_path / 'gone.jpg'}" and items[1].image_bytes is None
    assert items[2].error == f"not_a_regular_file: {tmp_path / 'dir.jpg'} is a directory"
    assert items[2].image_bytes is None
    assert items[0].error is None and items[3].error is None


def test_unsafe_names_still_get_valid_distinct_keys(tmp_path, image_bytes) -> None:
    for name in ("日本.jpg", "中国.jpg", "My Photo (1).JPG"):
        (tmp_path / name).write_bytes(image_bytes())
    source = FolderSource(tmp_path)
    keys = [i.key for i in source.read(source.list_refs())]
    assert all(KEY_PATTERN.match(k) for k in keys)
    assert len(set(keys)) == 3
    assert "my_photo_-1" in keys


def test_decode_text_and_item_key_helpers() -> None:
    notes: list[str] = []
    assert decode_text("\ufeffhé".encode()) == "hé"
    assert decode_text(b"\xff ok", notes, "x.txt") == "\ufffd ok"
    assert notes == ["not_utf8: x.txt: invalid bytes replaced"]
    assert item_key("Sub/Dir/Cat") == "sub_dir_cat"
    assert item_key("日本") == item_key("日本") != item_key("中国")


def test_links_out_of_the_root_fifos_and_devices_are_error_rows_never_read(tmp_path, image_bytes) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "passwd").write_text("root:x:0:0:SECRET")
    (outside / "theirs.jpg").write_bytes(image_bytes())
    (root / "cat.jpg").write_bytes(image_bytes())
    (root / "cat.txt").symlink_to(outside / "passwd")  # the sidecar must not become the caption
    (root / "stolen.jpg").symlink_to(outside / "theirs.jpg")
    (root / "zero.jpg").symlink_to("/dev/zero")
    os.mkfifo(root / "fifo.jpg")  # reading it would block forever
    (root / "alias.jpg").symlink_to(root / "cat.jpg")  # a link inside the root is fine
    source = FolderSource(root)
    assert source.list_refs() == ["alias.jpg", "cat.jpg", "fifo.jpg", "stolen.jpg", "zero.jpg"]
    items = {i.source_id: i for i in source.read(source.list_refs())}
    cat = items["cat.jpg"]
    assert cat.error is None and cat.known.captions == []
    assert cat.known.notes == [f"sidecar_skipped: outside_root: {root / 'cat.txt'} resolves to {outside / 'passwd'}, "
                               f"outside the input root {root} (--follow-symlinks names folders links may point into)"]
    assert items["alias.jpg"].image_bytes == cat.image_bytes
    assert items["stolen.jpg"].error.startswith(f"outside_root: {root / 'stolen.jpg'} resolves to ")
    assert items["zero.jpg"].error.startswith("outside_root: ")
    assert items["fifo.jpg"].error == f"not_a_regular_file: {root / 'fifo.jpg'} is a FIFO"
    assert all(items[ref].image_bytes is None for ref in ("stolen.jpg", "zero.jpg", "fifo.jpg"))


def test_follow_symlinks_reads_links_and_walks_linked_folders_into_named_targets(tmp_path, image_bytes) -> None:
    root, outside = tmp_path / "root", tmp_path / "shared"
    (outside / "more").mkdir(parents=True)
    root.mkdir()
    (outside / "theirs.jpg").write_bytes(image_bytes())
    (outside / "more" / "x.png").write_bytes(image_bytes("PNG"))
    (outside / "more" / "again").symlink_to(outside / "more")  # a cycle must not loop
    (root / "stolen.jpg").symlink_to(outside / "theirs.jpg")
    (root / "linked").symlink_to(outside / "more")
    assert FolderSource(root).list_refs() == ["stolen.jpg"]  # linked folders are not walked by default
    source = FolderSource(root, ReadPolicy.create(follow_symlinks=[outside]))
    refs = source.list_refs()
    assert refs == ["linked/x.png", "stolen.jpg"]
    assert all(item.error is None for item in source.read(refs))


def test_hidden_image_files_are_read_under_a_safe_key(tmp_path, image_bytes) -> None:
    (tmp_path / "..%2f..%2fevil.jpg").write_bytes(image_bytes())
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "inside.jpg").write_bytes(image_bytes())  # hidden folders are not inputs
    source = FolderSource(tmp_path)
    assert source.list_refs() == ["..%2f..%2fevil.jpg"]
    (item,) = source.read(source.list_refs())
    assert item.error is None and KEY_PATTERN.match(item.key)


def test_size_caps_apply_before_reading(tmp_path, image_bytes) -> None:
    (tmp_path / "big.jpg").write_bytes(image_bytes())
    (tmp_path / "big.txt").write_text("x" * 50)
    policy = ReadPolicy.create(max_image_bytes=10, max_text_bytes=20)
    (item,) = FolderSource(tmp_path, policy).read(["big.jpg"])
    assert item.error.startswith(f"too_large: {tmp_path / 'big.jpg'} is ") and item.error.endswith(
        "bytes, over source.max_image_bytes=10")
    assert item.known.notes == [f"sidecar_skipped: too_large: {tmp_path / 'big.txt'} is 50 bytes, "
                                "over source.max_text_bytes=20"]


def test_a_folder_that_cannot_be_listed_is_an_error_row(tmp_path, image_bytes, monkeypatch) -> None:
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "x.jpg").write_bytes(image_bytes())
    (tmp_path / "a.jpg").write_bytes(image_bytes())
    real_scandir = os.scandir

    def scandir(path):  # as chmod 000 would (root ignores the mode bits)
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "listdir", lambda path: scandir(path) and [])
    source = FolderSource(tmp_path)
    assert source.list_refs() == ["a.jpg", "locked/"]
    _, locked = source.read(source.list_refs())
    assert locked.error == f"unreadable: folder {tmp_path / 'locked'} cannot be listed: Permission denied"
    assert KEY_PATTERN.match(locked.key)
