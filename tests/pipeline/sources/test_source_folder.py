"""pipeline.sources.folder.FolderSource: listing, keys, sidecar captions, bad inputs."""

from __future__ import annotations

from data_schemas import KEY_PATTERN
from pipeline.sources.base import Source
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
