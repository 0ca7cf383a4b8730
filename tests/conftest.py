"""Shared fixtures: small valid records and JPEG bytes built in memory."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from data_schemas import Caption, ImageRecord, Region, RegionCaption, Tag


def jpeg_bytes(width: int = 48, height: int = 32, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_record(key: str, jpg: bytes, n_regions: int = 2, width: int = 48, height: int = 32) -> ImageRecord:
    regions = [
        Region(
            id=i,
            box_xyxy=(1.0 + i, 2.0, 20.0 + i, 30.0),
            label="three",
            annotator="ground_truth",
            captions=[RegionCaption(text=f"a three number {i}", annotator="ground_truth")],
            tags=[Tag(name="three", annotator="ground_truth")],
        )
        for i in range(n_regions)
    ]
    return ImageRecord(
        key=key,
        source="test",
        source_id=f"{key}.jpg",
        width=width,
        height=height,
        sha256=hashlib.sha256(jpg).hexdigest(),
        tags=[Tag(name="three", annotator="ground_truth")],
        captions=[
            Caption(text=f"low {key}", annotator="a", clip_score=0.1, kept=True),
            Caption(text=f"best {key}", annotator="a", clip_score=0.3, kept=True),
            Caption(text=f"dropped {key}", annotator="a", clip_score=0.9, kept=False),
        ],
        regions=regions,
    )


@pytest.fixture
def record_factory():
    """``record_factory(key, n_regions=2) -> (ImageRecord, jpg bytes)``."""

    def build(key: str, n_regions: int = 2, seed: int = 0):
        jpg = jpeg_bytes(seed=seed)
        return make_record(key, jpg, n_regions=n_regions), jpg

    return build


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``(run_dir, checkpoint_dir)`` of an untrained ``umg-tiny-vit`` saved through the real save path
    (``model.checkpoint.save_checkpoint``), with token clustering on in its config."""
    import torch

    from data_schemas import TrainConfig
    from model.checkpoint import model_from_config, save_checkpoint

    config = TrainConfig.model_validate({"model": {"name": "umg-tiny-vit", "cluster": {"reduction": 0.75, "layer": 1}}})
    torch.manual_seed(0)
    model = model_from_config(config.model)
    run = tmp_path_factory.mktemp("tiny-run")
    return run, save_checkpoint(run, 1, model, config, {"step": 1})


@pytest.fixture
def single_thread():
    """torch on one thread for the test (a shared 2-core box: OpenMP hand-offs slow small models down)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS on free loopback ports, ``flows.object_store``), stopped by pid at the end."""
    from flows.object_store import start_s3
    from flows.services import stop

    server = start_s3(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        stop(server.pid, timeout=5)


@pytest.fixture
def s3_bucket(s3_server, monkeypatch, request) -> str:
    """``s3://<new bucket>`` on ``s3_server``, with the client variables (``AWS_*``) set for this test only."""
    from flows.object_store import make_bucket

    from s3fs import S3FileSystem

    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    S3FileSystem.clear_instance_cache()  # clients are cached per process with the variables they were made with
    digest = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:12]
    return make_bucket(s3_server, f"t-{digest}")
