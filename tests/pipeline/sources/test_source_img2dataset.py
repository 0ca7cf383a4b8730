"""pipeline.sources.img2dataset.Img2DatasetSource: tars, parquet, single scan, broken containers."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from data_schemas import KEY_PATTERN
from pipeline.sources.base import Source
from pipeline.sources.confine import ReadPolicy
from pipeline.sources.img2dataset import Img2DatasetSource


def write_tar(path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


@pytest.fixture
def i2d_root(tmp_path, image_bytes):
    """00000.tar (3 samples + a text-only one), its metadata parquet, and 00001.parquet with images."""
    jpgs = {k: image_bytes(color=(i * 40, 0, 0)) for i, k in enumerate(["000000000", "000000001", "000000002"])}
    write_tar(
        tmp_path / "00000.tar",
        [
            {"__key__": "000000000", "jpg": jpgs["000000000"], "txt": "a red square", "json": b'{"caption": "x"}'},
            {"__key__": "000000001", "jpg": jpgs["000000001"], "txt": b"caf\xe9 noir"},
            {"__key__": "000000002", "jpg": jpgs["000000002"], "json": json.dumps({"caption": "from json"}).encode()},
            {"__key__": "000000003", "txt": "caption but no image"},
        ],
    )
    pq.write_table(pa.table({"key": ["000000000"], "status": ["success"]}), tmp_path / "00000.parquet")
    png = image_bytes("PNG")
    pq.write_table(
        pa.table(
            {
                "key": ["000010001", "000010000"],
                "url": ["http://x/1", "http://x/0"],
                "caption": ["failed one", "a parquet picture"],
                "status": ["failed_to_download", "success"],
                "error_message": ["timeout", None],
                "jpg": pa.array([None, png], type=pa.binary()),
            }
        ),
        tmp_path / "00001.parquet",
    )
    return tmp_path, {**jpgs, "000010000": png}


def test_lists_tar_and_image_parquet_refs_sorted(i2d_root) -> None:
    root, _ = i2d_root
    source = Img2DatasetSource(root)
    assert isinstance(source, Source) and source.kind == "img2dataset"
    assert source.containers() == ["00000.tar", "00001.parquet"]  # 00000.parquet is metadata only
    refs = source.list_refs()
    assert refs == [
        "00000.tar/000000000",
        "00000.tar/000000001",
        "00000.tar/000000002",
        "00000.tar/000000003",
        "00001.parquet/000010000",
        "00001.parquet/000010001",
    ]
    assert Img2DatasetSource(root).list_refs() == refs


def test_reads_items_in_ref_order_with_captions(i2d_root) -> None:
    root, jpgs = i2d_root
    refs = ["00001.parquet/000010000", "00000.tar/000000002", "00000.tar/000000000", "00000.tar/000000001"]
    items = list(Img2DatasetSource(root).read(refs))
    assert [i.source_id for i in items] == refs
    assert [i.key for i in items] == ["000010000", "000000002", "000000000", "000000001"]
    assert [i.image_bytes for i in items] == [jpgs[i.key] for i in items]
    assert all(i.error is None for i in items)
    captions = [[(c.text, c.annotator) for c in i.known.captions] for i in items]
    assert captions == [
        [("a parquet picture", "alt_text")],
        [("from json", "alt_text")],
        [("a red square", "alt_text")],  # txt wins over json
        [("caf\ufffd noir", "alt_text")],
    ]
    assert items[3].known.notes == ["not_utf8: 00000.tar/000000001.txt: invalid bytes replaced"]


def test_missing_images_become_error_items(i2d_root) -> None:
    root, _ = i2d_root
    refs = ["00000.tar/000000003", "00001.parquet/000010001", "00000.tar/999", "nope.tar/1"]
    items = list(Img2DatasetSource(root).read(refs))
    assert [i.source_id for i in items] == refs
    assert all(i.image_bytes is None for i in items)
    assert items[0].error == "missing_image: 00000.tar/000000003"
    assert items[0].known.captions[0].text == "caption but no image"
    assert items[1].error == "missing_image: 00001.parquet/000010001 (status=failed_to_download: timeout)"
    assert items[2].error == "missing_image: 00000.tar/999"
    assert items[3].error == f"missing_image: {root / 'nope.tar'}"


def test_each_tar_is_scanned_once_per_batch(i2d_root, monkeypatch) -> None:
    root, _ = i2d_root
    source = Img2DatasetSource(root)
    refs = source.list_refs()
    opened: list[str] = []
    real_open = tarfile.open

    def counting_open(name=None, *args, **kwargs):
        opened.append(str(name or kwargs["fileobj"].name))
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(tarfile, "open", counting_open)
    interleaved = [refs[0], refs[4], refs[1], refs[5], refs[2]]
    assert len(list(source.read(interleaved))) == 5
    assert len(opened) == 1  # one confined file object, opened once for the batch


def test_corrupt_and_truncated_tars_surface_as_error_items(tmp_path, image_bytes) -> None:
    (tmp_path / "00000.tar").write_bytes(b"this is not a tar archive at all" * 40)
    big = [{"__key__": f"{i:03d}", "jpg": image_bytes(size=(64, 64)) + bytes(4000)} for i in range(3)]
    write_tar(tmp_path / "00001.tar", big)
    whole = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(whole[: len(whole) // 2])
    source = Img2DatasetSource(tmp_path)
    refs = source.list_refs()
    assert "00000.tar/" in refs and "00001.tar/" in refs and "00001.tar/000" in refs
    items = {i.source_id: i for i in Img2DatasetSource(tmp_path).read(refs)}
    assert len(items) == len(refs)
    assert items["00000.tar/"].error.startswith("unreadable: 00000.tar: ")
    assert items["00001.tar/"].error.startswith("unreadable: 00001.tar: ")
    assert items["00001.tar/000"].error is None and items["00001.tar/000"].image_bytes == big[0]["jpg"]
    assert all(KEY_PATTERN.match(i.key) for i in items.values())


def test_parquet_without_image_column_and_without_tar_is_reported(tmp_path) -> None:
    pq.write_table(pa.table({"key": ["1"], "caption": ["x"]}), tmp_path / "meta.parquet")
    assert Img2DatasetSource(tmp_path).list_refs() == ["meta.parquet/"]
    (item,) = Img2DatasetSource(tmp_path).read(["meta.parquet/"])  # a fresh reader, as on a worker
    assert item.error == "unreadable: meta.parquet: no image column (looked for jpg, jpeg, png, webp)"
    assert KEY_PATTERN.match(item.key)


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_repeated_member_names_and_keys_each_get_a_duplicate_row(tmp_path, image_bytes) -> None:
    first, second = image_bytes(color=(1, 2, 3)), image_bytes(color=(200, 0, 0))
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        _add(tar, "a.jpg", first)
        _add(tar, "a.txt", b"first")
        _add(tar, "b.jpg", first)
        _add(tar, "a.jpg", second)  # the same member name again, later in the tar
    pq.write_table(pa.table({"key": ["k", "k"], "jpg": [first, second]}), tmp_path / "00001.parquet")
    source = Img2DatasetSource(tmp_path)
    refs = source.list_refs()
    assert refs == ["00000.tar#dup2/a", "00000.tar/a", "00000.tar/b", "00001.parquet#dup2/k", "00001.parquet/k"]
    items = {i.source_id: i for i in Img2DatasetSource(tmp_path).read(refs)}
    assert items["00000.tar/a"].image_bytes == first and items["00000.tar/a"].known.captions[0].text == "first"
    assert items["00000.tar#dup2/a"].error.startswith("duplicate_key: 'a' occurs again in 00000.tar (occurrence 2")
    assert items["00001.parquet/k"].image_bytes == first
    capped = Img2DatasetSource(tmp_path, ReadPolicy.create(max_image_bytes=len(first) - 1))
    (item,) = capped.read(["00001.parquet/k"])
    assert item.error == (f"too_large: 00001.parquet/k image is {len(first)} bytes, "
                          f"over source.max_image_bytes={len(first) - 1}")
    assert items["00001.parquet#dup2/k"].error.startswith("duplicate_key: 'k' occurs again in 00001.parquet")
    assert all(KEY_PATTERN.match(i.key) for i in items.values())


def test_link_hidden_and_oversized_members_are_rows_with_reasons(tmp_path, image_bytes) -> None:
    jpg = image_bytes()
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        _add(tar, "ok.jpg", jpg)
        _add(tar, "ok.txt", b"x" * 40)  # over max_text_bytes: a note, the image is kept
        _add(tar, "link.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")
        _add(tar, "hard.jpg", kind=tarfile.LNKTYPE, link="ok.jpg")
        _add(tar, ".hidden.jpg", jpg)
        _add(tar, "big.jpg", jpg + bytes(100))
    policy = ReadPolicy.create(max_image_bytes=len(jpg), max_text_bytes=20)
    refs = Img2DatasetSource(tmp_path, policy).list_refs()
    assert refs == ["00000.tar#hidden/.hidden.jpg", "00000.tar/big", "00000.tar/hard", "00000.tar/link",
                    "00000.tar/ok"]
    items = {i.source_id: i for i in Img2DatasetSource(tmp_path, policy).read(refs)}
    assert items["00000.tar/link"].error == "not_a_regular_file: link.jpg is a symlink member of 00000.tar"
    assert items["00000.tar/hard"].error == "not_a_regular_file: hard.jpg is a hard link member of 00000.tar"
    assert items["00000.tar/big"].error.startswith("too_large: member big.jpg of 00000.tar is ")
    assert items["00000.tar#hidden/.hidden.jpg"].error.startswith("hidden_member: .hidden.jpg in 00000.tar")
    ok = items["00000.tar/ok"]
    assert ok.image_bytes == jpg and ok.known.captions == []
    assert ok.known.notes == ["skipped member: too_large: member ok.txt of 00000.tar is 40 bytes, "
                              "over source.max_text_bytes=20"]


def test_tar_cut_inside_a_header_keeps_the_samples_before_and_reports_the_rest(tmp_path, image_bytes) -> None:
    samples = [{"__key__": f"{i:03d}", "jpg": image_bytes(color=(i, 0, 0))} for i in range(3)]
    write_tar(tmp_path / "00000.tar", samples)
    whole = (tmp_path / "00000.tar").read_bytes()
    with tarfile.open(tmp_path / "00000.tar") as tar:
        third = tar.getmembers()[2].offset  # header of the third sample
    (tmp_path / "00000.tar").write_bytes(whole[: third + 100])  # cut 100 bytes into that header
    refs = Img2DatasetSource(tmp_path).list_refs()
    assert refs == ["00000.tar/", "00000.tar/000", "00000.tar/001"]
    items = {i.source_id: i for i in Img2DatasetSource(tmp_path).read(refs)}
    assert items["00000.tar/"].error == (
        f"unreadable: 00000.tar: archive ends with cut inside a header at byte {third} (after 2 samples)")
    assert items["00000.tar/001"].image_bytes == samples[1]["jpg"]


def test_containers_that_are_links_out_or_fifos_are_one_error_row_each(tmp_path, image_bytes) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    write_tar(outside / "theirs.tar", [{"__key__": "x", "jpg": image_bytes()}])
    (root / "00000.tar").symlink_to(outside / "theirs.tar")
    os.mkfifo(root / "00001.tar")
    refs = Img2DatasetSource(root).list_refs()
    assert refs == ["00000.tar/", "00001.tar/"]
    first, second = Img2DatasetSource(root).read(refs)
    assert first.error.startswith(f"outside_root: {root / '00000.tar'} resolves to ")
    assert second.error == f"not_a_regular_file: {root / '00001.tar'} is a FIFO"
