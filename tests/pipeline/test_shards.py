from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline.shards import (
    ShardError,
    ShardWriter,
    discard_partial,
    finished_shards,
    iter_records,
    read_shard_rows,
    read_stats,
    shard_paths,
    taken_keys,
    write_build_manifest,
)


def _write_shard(build_dir, name, records, errors=(), taken=None):
    with ShardWriter(build_dir, name, taken_keys=taken) as writer:
        for record, jpg in records:
            writer.write(record, jpg)
        for key, source_id, reason in errors:
            writer.write_error(key, source_id, reason)
        return writer.commit()


def test_commit_writes_three_files_and_reads_back(tmp_path, record_factory):
    records = [record_factory(f"img-{i}", n_regions=i, seed=i) for i in range(3)]
    stats = _write_shard(tmp_path, "00000", records, errors=[("bad", "bad.jpg", "truncated: cut")])

    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.parquet", "00000.stats.json", "00000.tar"]
    assert (stats.n_inputs, stats.n_ok, stats.n_error) == (4, 3, 1)
    assert stats.counts["n_regions"] == 0 + 1 + 2
    assert stats.errors == {"truncated": 1}
    back = list(iter_records(tmp_path))
    assert [r.key for r, _ in back] == ["img-0", "img-1", "img-2"]
    assert [jpg for _, jpg in back] == [jpg for _, jpg in records]
    assert back[2][0] == records[2][0]
    rows = read_shard_rows(tmp_path, "00000")
    assert [(r["key"], r["status"]) for r in rows] == [("img-0", "ok"), ("img-1", "ok"), ("img-2", "ok"), ("bad", "error")]
    assert rows[3]["error"] == "truncated: cut"
    assert read_stats(tmp_path, "00000") == stats


def test_stock_webdataset_reads_jpg_and_best_caption(tmp_path, record_factory):
    _write_shard(tmp_path, "00000", [record_factory("a"), record_factory("b", seed=1)])
    dataset = wds.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False).decode("pil").to_tuple("jpg", "txt")
    samples = list(dataset)
    assert [txt for _, txt in samples] == ["best a", "best b"]  # highest clip_score among kept captions
    assert samples[0][0].size == (48, 32)


def test_duplicate_and_bad_keys_become_error_rows(tmp_path, record_factory):
    first = record_factory("same")
    second = record_factory("same", seed=3)
    taken = {"elsewhere"}
    with ShardWriter(tmp_path, "00000", taken_keys=taken) as writer:
        assert writer.write(*first)
        assert not writer.write(*second)
        assert not writer.write(*record_factory("elsewhere"))
        stats = writer.commit()
    assert (stats.n_ok, stats.n_error) == (1, 2)
    rows = read_shard_rows(tmp_path, "00000")
    assert [r["error"].split(":")[0] for r in rows if r["status"] == "error"] == ["duplicate_key", "duplicate_key"]
    assert [r.key for r, _ in iter_records(tmp_path)] == ["same"]
    assert "same" in taken  # the committed keys are now reserved for later shards


def test_exception_inside_writer_leaves_nothing(tmp_path, record_factory):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "00003") as writer:
            writer.write(*record_factory("a"))
            raise RuntimeError("annotator crashed")
    assert list(tmp_path.iterdir()) == []


def test_partial_pieces_are_not_finished_and_get_discarded(tmp_path, record_factory):
    _write_shard(tmp_path, "00000", [record_factory("a")])
    _write_shard(tmp_path, "00001", [record_factory("b")])
    shard_paths(tmp_path, "00001")[".stats.json"].unlink()  # as if killed before the marker
    (tmp_path / "00002.tar.tmp").write_bytes(b"partial")
    assert finished_shards(tmp_path) == ["00000"]
    removed = sorted(p.name for p in discard_partial(tmp_path))
    assert removed == ["00001.parquet", "00001.tar", "00002.tar.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.parquet", "00000.stats.json", "00000.tar"]


def test_build_manifest_lists_finished_shards(tmp_path, record_factory):
    _write_shard(tmp_path, "00000", [record_factory("a"), record_factory("b")])
    _write_shard(tmp_path, "00001", [record_factory("c")], errors=[("d", "d.jpg", "empty: zero-byte file")])
    rows = pq.read_table(write_build_manifest(tmp_path)).to_pylist()
    assert [(r["shard"], r["n_inputs"], r["n_ok"], r["n_error"], r["n_regions"]) for r in rows] == [
        ("00000", 2, 2, 0, 4),
        ("00001", 2, 1, 1, 2),
    ]
    assert taken_keys(tmp_path) == {"a", "b", "c"}


def test_reader_names_a_sample_that_does_not_validate(tmp_path, record_factory):
    record, jpg = record_factory("a")
    with ShardWriter(tmp_path, "00000") as writer:
        writer.write(record, jpg)
        writer.commit()
    # Rewrite the tar with a json member that breaks the schema (box outside the image).
    import io
    import tarfile

    payload = json.loads(record.model_dump_json())
    payload["regions"][0]["box_xyxy"] = [0, 0, 999, 10]
    tar_path = shard_paths(tmp_path, "00000")[".tar"]
    with tarfile.open(tar_path, "w") as tar:
        for name, data in [("a.jpg", jpg), ("a.json", json.dumps(payload).encode())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ShardError, match="(?s)sample .a. does not validate.*outside image"):
        list(iter_records(tmp_path))
