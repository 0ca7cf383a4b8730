"""`umg build` / `umg validate` with the input and the output on a real object store: S3 (SeaweedFS) and GCS
(fake-gcs-server), ``store_bucket``.

Credentials and endpoints reach the CLI only through the standard environment variables the fixtures set
(``AWS_*``; ``STORAGE_EMULATOR_HOST``).
"""

from __future__ import annotations

import json

from s3fs import S3FileSystem
from typer.testing import CliRunner

from flows.cli import app
from pipeline.output_lease import LEASE_NAME
from pipeline.storage import as_path, names_in


def _upload(server, local_dir, url: str) -> None:
    server.filesystem().put(str(local_dir), url.removeprefix("s3://"), recursive=True)


def _last_json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def test_build_from_a_bucket_to_a_bucket_validates_and_resumes(store_bucket, sample_raw):
    """The output locked by default (its lease: s3 If-None-Match / If-Match, gs ifGenerationMatch), the inputs
    read from the store, the shards validated there."""
    bucket, fs = store_bucket
    fs.put(str(sample_raw), f"{bucket.split('://', 1)[1]}/raw", recursive=True)
    cli = CliRunner()
    args = ["build", "--input", f"{bucket}/raw", "--output", f"{bucket}/shards", "--set", "shard_size=8"]
    first = _last_json(cli.invoke(app, args))
    assert first["written"] == first["planned"] > 1 and first["errors"] == 0 and first["inputs"] == 16
    report = _last_json(cli.invoke(app, ["validate", f"{bucket}/shards"]))
    assert report["ok"] and report["samples"] == 16
    assert LEASE_NAME not in names_in(as_path(f"{bucket}/shards"))  # the build released its lease
    again = _last_json(cli.invoke(app, args))
    assert again["written"] == 0 and again["skipped"] == first["planned"]


def test_without_credentials_the_build_fails_with_one_error_line(s3_server, s3_bucket, sample_raw, monkeypatch):
    _upload(s3_server, sample_raw, f"{s3_bucket}/raw")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    S3FileSystem.clear_instance_cache()  # fsspec keeps one client per process, made with the old variables
    result = CliRunner().invoke(app, ["build", "--input", f"{s3_bucket}/raw", "--output", f"{s3_bucket}/out"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and "wrong" not in result.output
