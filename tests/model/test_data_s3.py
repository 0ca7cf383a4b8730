"""Training reads shards straight from a real S3 server (SeaweedFS): the same batches as from disk; `umg train`."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from data_schemas.train_config import DataSection
from flows.cli import app
from model.data import TextTokens, TransformSpec, count_samples, make_dataset
from model.factory import get_tokenizer
from model.trainer import resolve_tars
from pipeline.sample_shards import write_sample_shards


@pytest.fixture
def shards_on_s3(s3_server, s3_bucket, tmp_path):
    local = tmp_path / "shards"
    write_sample_shards(local, n=20, seed=0, shard_size=4)  # train: 16 images in 4 shards
    s3_server.filesystem().put(str(local / "train"), f"{s3_bucket.removeprefix('s3://')}/train", recursive=True)
    return local / "train", f"{s3_bucket}/train"


def _keys(tars) -> list[list[str]]:
    spec = TransformSpec(image_size=64, mean=(0.5,) * 3, std=(0.25,) * 3, crop="full")
    data = DataSection(workers=0, shuffle_buffer=8, shuffle_initial=4)
    dataset = make_dataset(tars, data, spec, TextTokens(get_tokenizer("umg-tiny-vit")), batch_size=4)
    return [batch.keys for batch in dataset]


def test_batches_from_s3_equal_batches_from_disk(shards_on_s3):
    local, url = shards_on_s3
    remote_tars = resolve_tars(url)
    assert all(str(tar).startswith(url + "/") for tar in remote_tars) and len(remote_tars) == 4
    assert count_samples(remote_tars) == 16
    torch.manual_seed(0)
    assert _keys(remote_tars) == _keys(resolve_tars(local))


@pytest.mark.slow
def test_umg_train_reads_shards_from_s3(shards_on_s3, tmp_path):
    _, url = shards_on_s3
    config = tmp_path / "train.yaml"
    config.write_text("train:\n  batch_size: 4\n  steps: 2\n  data:\n    workers: 1\n  progress: false\n")
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--shards", url, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["steps"] == 2
