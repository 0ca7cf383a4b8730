"""The `build-umg41m` flow with its input and output on a real S3 server (SeaweedFS): shard tasks on Ray write
the bucket through the partitioned key ledger; the bucket validates; a rerun writes nothing."""

from __future__ import annotations

from collections import Counter

import pytest
from helpers_backends import write_config

from flows.build import build_umg41m
from pipeline.shards import finished_shards, read_shard_rows
from pipeline.storage import as_path, names_in


@pytest.mark.slow
@pytest.mark.e2e
def test_build_flow_from_s3_to_s3_with_shard_tasks(prefect_server, s3_server, s3_bucket, sample_raw, tmp_path):
    import ray

    s3_server.filesystem().put(str(sample_raw), f"{s3_bucket.removeprefix('s3://')}/raw", recursive=True)
    out = f"{s3_bucket}/shards"
    cfg = write_config(tmp_path / "c.yaml", None, flow={"concurrent_shards": 2, "key_partitions": 3})
    try:
        state = build_umg41m(str(cfg), f"{s3_bucket}/raw", out, return_state=True)
        assert state.is_completed(), state.message
        summary = state.result()
        assert summary["build_dir"] == out and summary["ok"] and summary["written"] == 4 and summary["samples"] == 16
        rows = [row for name in finished_shards(out) for row in read_shard_rows(out, name)]
        assert len(rows) == 16 and all(n == 1 for n in Counter(row["source_id"] for row in rows).values())
        assert {"_manifest.parquet", "_plan.json", "_completed.json", "_qa"} <= set(names_in(as_path(out)))
        again = build_umg41m(str(cfg), f"{s3_bucket}/raw", out, return_state=True)
        assert again.is_completed() and again.result()["written"] == 0 and not again.result()["announced"]
    finally:
        if ray.is_initialized():
            ray.shutdown()
