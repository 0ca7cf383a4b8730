"""Shards on real object stores (SeaweedFS for s3://, fake-gcs-server for gs://, ``store_bucket``): written
under final names, stats last; resume discards pieces."""

from __future__ import annotations

import pyarrow.parquet as pq

from pipeline.shards import (
    ShardWriter,
    discard_partial,
    finished_shards,
    iter_records,
    read_shard_rows,
    read_stats,
    shard_paths,
    write_build_manifest,
)
from pipeline.storage import as_path, names_in
from pipeline.validate import validate_build


def _write(build_dir: str, name: str, records) -> None:
    with ShardWriter(build_dir, name) as writer:
        for record, jpg in records:
            writer.write(record, jpg)
        writer.write_error("bad", "bad.jpg", "truncated: cut")
        writer.commit()


def test_shards_round_trip_on_an_object_store(store_bucket, record_factory):
    build = f"{store_bucket[0]}/builds/one"
    _write(build, "00000", [record_factory("a"), record_factory("b", seed=1)])
    _write(build, "00001", [record_factory("c")])
    assert names_in(as_path(build)) == ["00000.parquet", "00000.stats.json", "00000.tar",
                                        "00001.parquet", "00001.stats.json", "00001.tar"]
    assert finished_shards(build) == ["00000", "00001"]
    assert [record.key for record, _ in iter_records(build)] == ["a", "b", "c"]
    assert [row["status"] for row in read_shard_rows(build, "00000")] == ["ok", "ok", "error"]
    assert read_stats(build, "00001").n_ok == 1
    with write_build_manifest(build).open("rb") as handle:
        assert [row["shard"] for row in pq.read_table(handle).to_pylist()] == ["00000", "00001"]
    report = validate_build(build)
    assert report.ok, report.problems
    assert (report.shards, report.samples, report.errors) == (2, 3, 2)


def test_a_shard_without_its_stats_is_unfinished_and_discarded(store_bucket, record_factory):
    build = f"{store_bucket[0]}/b"
    _write(build, "00000", [record_factory("a")])
    _write(build, "00001", [record_factory("b")])
    shard_paths(build, "00001")[".stats.json"].unlink()  # as if killed before the done-marker
    assert finished_shards(build) == ["00000"]
    assert not validate_build(build).ok
    removed = sorted(path.name for path in discard_partial(build))
    assert removed == ["00001.parquet", "00001.tar"]
    assert names_in(as_path(build)) == ["00000.parquet", "00000.stats.json", "00000.tar"]


def test_a_failed_writer_leaves_nothing_in_the_bucket(store_bucket, record_factory):
    build = f"{store_bucket[0]}/c"
    try:
        with ShardWriter(build, "00000") as writer:
            writer.write(*record_factory("a"))
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert names_in(as_path(build)) == []
