"""Input confinement for URLs: nothing is read outside the given s3:// prefix (real S3 server, SeaweedFS)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from data_schemas import SourceConfig
from pipeline.sources.confine import ReadPolicy
from pipeline.sources.folder import FolderSource
from pipeline.sources.registry import build_source


def jpeg_bytes(seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(32, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def bucket(s3_server, s3_bucket):
    fs = s3_server.filesystem()
    root = s3_bucket.removeprefix("s3://")
    fs.pipe({f"{root}/in/a.jpg": jpeg_bytes(), f"{root}/in/sub/b.jpg": jpeg_bytes(seed=1),
             f"{root}/in/sub/b.txt": b"a caption", f"{root}/in/.hidden/c.jpg": jpeg_bytes(),
             f"{root}/in/big.jpg": b"x" * 5000, f"{root}/in-sibling/d.jpg": jpeg_bytes(),
             f"{root}/outside/secret.jpg": jpeg_bytes(seed=2)})
    return s3_bucket


def test_folder_lists_and_reads_under_the_prefix_only(bucket):
    source = FolderSource(f"{bucket}/in", ReadPolicy(max_image_bytes=4000))
    refs = source.list_refs()
    assert refs == ["a.jpg", "big.jpg", "sub/b.jpg"]  # not in-sibling/, not .hidden/
    items = {item.source_id: item for item in source.read([*refs, "../outside/secret.jpg", "./a.jpg", "sub//b.jpg"])}
    assert items["a.jpg"].image_bytes == jpeg_bytes()
    assert items["sub/b.jpg"].known.captions[0].text == "a caption"
    assert items["big.jpg"].error.startswith("too_large:")
    for ref in ("../outside/secret.jpg", "./a.jpg", "sub//b.jpg"):
        assert items[ref].image_bytes is None and items[ref].error.startswith("outside_root:"), items[ref].error


def test_a_prefix_named_like_an_image_is_not_a_regular_file(bucket):
    item = next(FolderSource(f"{bucket}/in").read(["sub"]))
    assert item.error.startswith(("not_a_regular_file:", "missing_image:")), item.error


def test_coco_file_names_cannot_leave_the_image_prefix(s3_server, bucket):
    root = bucket.removeprefix("s3://")
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 48, "height": 32},
                       {"id": 2, "file_name": "../outside/secret.jpg", "width": 48, "height": 32}],
            "annotations": [], "categories": []}
    s3_server.filesystem().pipe(f"{root}/in/annotations/instances_train.json", json.dumps(coco).encode())
    source = build_source(SourceConfig(path=f"{bucket}/in/annotations/instances_train.json", image_dir=f"{bucket}/in"))
    assert source.kind == "coco"
    items = list(source.read(source.list_refs()))
    assert items[0].image_bytes == jpeg_bytes()
    assert items[1].image_bytes is None and items[1].error.startswith("outside_root:")
