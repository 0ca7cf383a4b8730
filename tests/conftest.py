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


def _serve(start, directory):
    """The server ``start(directory)`` returns, for a session; stopped by pid at the end."""
    from flows.services import stop

    server = start(directory)
    try:
        yield server
    finally:
        stop(server.pid, timeout=5)


def _new_bucket(server, monkeypatch, request, filesystem_class) -> str:
    """A bucket named for the test on ``server``, the client variables (``server.env``) set for this test only."""
    from flows.object_store import make_bucket

    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    filesystem_class.clear_instance_cache()  # clients are cached per process with the variables they were made with
    digest = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:12]
    return make_bucket(server, f"t-{digest}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS on free loopback ports, ``flows.object_store``), stopped by pid at the end."""
    from flows.object_store import start_s3

    yield from _serve(start_s3, tmp_path_factory.mktemp("seaweedfs"))


@pytest.fixture
def s3_bucket(s3_server, monkeypatch, request) -> str:
    """``s3://<new bucket>`` on ``s3_server``, with the client variables (``AWS_*``) set for this test only."""
    from s3fs import S3FileSystem

    return _new_bucket(s3_server, monkeypatch, request, S3FileSystem)


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """A real GCS JSON-API server (fake-gcs-server on a free loopback port, ``flows.object_store``), stopped by pid.

    gcsfs is bound to its plain JSON-API class for the session (``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` in
    ``gcs_server.env`` does the same in subprocesses): its default class asks a gRPC control API, which no
    emulator serves, for each bucket.
    """
    import fsspec
    from gcsfs.core import GCSFileSystem

    from flows.object_store import start_gcs

    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, GCSFileSystem, clobber=True)
    yield from _serve(start_gcs, tmp_path_factory.mktemp("fake-gcs"))


@pytest.fixture
def gcs_bucket(gcs_server, monkeypatch, request) -> str:
    """``gs://<new bucket>`` on ``gcs_server``, with ``STORAGE_EMULATOR_HOST`` set for this test only."""
    from gcsfs.core import GCSFileSystem

    return _new_bucket(gcs_server, monkeypatch, request, GCSFileSystem)


@pytest.fixture(params=["s3", "gs"])
def store_bucket(request) -> tuple[str, object]:
    """A new bucket on each real object store of the tests, as ``(url, filesystem)``: ``s3://`` on SeaweedFS
    (``s3_bucket``), ``gs://`` on fake-gcs-server (``gcs_bucket``); the filesystem uploads test data."""
    server = request.getfixturevalue({"s3": "s3_server", "gs": "gcs_server"}[request.param])
    url = request.getfixturevalue({"s3": "s3_bucket", "gs": "gcs_bucket"}[request.param])
    return url, server.filesystem()
