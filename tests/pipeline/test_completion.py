"""``_completed.json``: a finished build is announced once per content; changed shards are announced again."""

from __future__ import annotations

from data_schemas import ImageRecord
from pipeline.completion import already_announced, build_fingerprint, read_completion, record_completion
from pipeline.shards import ShardWriter


def _shard(build_dir, name, keys, errors=()):
    with ShardWriter(build_dir, name) as writer:
        for key in keys:
            writer.write(ImageRecord(key=key, source="t", source_id=key, width=4, height=4, sha256="0" * 64), b"jpg")
        for key in errors:
            writer.write_error(key, key, "annotator_failed: tagger: RuntimeError: boom")
        writer.commit()


def test_announced_once_per_content(tmp_path):
    _shard(tmp_path, "00000", ["a", "b"], errors=["c"])
    assert read_completion(tmp_path) is None and not already_announced(tmp_path)
    before = build_fingerprint(tmp_path)
    record_completion(tmp_path, run="r1")
    assert already_announced(tmp_path) and read_completion(tmp_path)["run"] == "r1"
    _shard(tmp_path, "00000", ["a", "b", "c"])  # the error row rebuilt: same shard, new content
    assert build_fingerprint(tmp_path) != before and not already_announced(tmp_path)
