"""pipeline.sources.registry: kind detection, build_source, split handling, config errors."""

from __future__ import annotations

import json
import tarfile

import pytest

from data_schemas import ConfigError, SourceConfig
from pipeline.sources.base import Source
from pipeline.sources.coco import CocoSource
from pipeline.sources.folder import FolderSource
from pipeline.sources.img2dataset import Img2DatasetSource
from pipeline.sources.registry import SOURCES, SplitSource, build_source, detect_kind
from pipeline.sources.vg import VisualGenomeSource


def test_registry_holds_the_four_readers() -> None:
    assert SOURCES == {
        "folder": FolderSource,
        "img2dataset": Img2DatasetSource,
        "coco": CocoSource,
        "vg": VisualGenomeSource,
    }
    assert all(cls.kind == kind for kind, cls in SOURCES.items())


def test_detect_kind_for_each_layout(tmp_path, coco_root, image_bytes) -> None:
    assert detect_kind(coco_root) == "coco"
    assert detect_kind(coco_root / "annotations" / "instances_val.json") == "coco"
    vg = tmp_path / "vg"
    vg.mkdir()
    (vg / "region_descriptions.json").write_text("[]")
    assert detect_kind(vg) == "vg"
    i2d = tmp_path / "i2d"
    i2d.mkdir()
    with tarfile.open(i2d / "00000.tar", "w"):
        pass
    assert detect_kind(i2d) == "img2dataset"
    folder = tmp_path / "folder" / "deep"
    folder.mkdir(parents=True)
    (folder / "x.PNG").write_bytes(image_bytes("PNG"))
    assert detect_kind(tmp_path / "folder") == "folder"


def test_detect_kind_errors_name_what_was_looked_for(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ConfigError) as err:
        detect_kind(tmp_path)
    message = str(err.value)
    for expected in ("annotations/instances_*.json", "region_descriptions.json", "*.tar", "*.parquet", "jpg"):
        assert expected in message
    with pytest.raises(ConfigError, match="does not exist"):
        detect_kind(tmp_path / "nowhere")


def test_coco_root_reads_all_splits_with_prefixed_refs(coco_root) -> None:
    source = build_source(SourceConfig(path=coco_root))
    assert isinstance(source, SplitSource) and isinstance(source, Source) and source.kind == "coco"
    refs = source.list_refs()
    assert refs == [
        "train/000000000001",
        "train/000000000002",
        "train/000000000003",
        "train/000000000010",
        "val/000000000001",
    ]
    wanted = ["val/000000000001", "train/000000000001", "test/000000000001", "train/000000000002"]
    items = list(source.read(wanted))
    assert [i.key for i in items] == ["val_000000", "train_000000", "coco-test_000000000001", "train_000001"]
    assert items[2].error == "bad_ref: no split 'test'" and items[2].image_bytes is None
    assert [c.text for c in items[1].known.captions] == ["a red three and a seven", "two digits"]
    assert all(items[i].error is None for i in (0, 1, 3))


def test_coco_single_split_infers_images_and_captions(coco_root) -> None:
    source = build_source(SourceConfig(annotations=coco_root / "annotations" / "instances_train.json"))
    assert isinstance(source, CocoSource)
    assert source.image_dir == coco_root / "images" / "train"
    assert source.captions_json == coco_root / "annotations" / "captions_train.json"
    assert source.list_refs()[0] == "000000000001"


def test_coco_explicit_kind_and_bad_fields(coco_root, tmp_path) -> None:
    with pytest.raises(ConfigError, match="source.captions names one file"):
        captions = coco_root / "annotations" / "captions_train.json"
        build_source(SourceConfig(kind="coco", path=coco_root, captions=captions))
    lonely = tmp_path / "lonely" / "instances_x.json"
    lonely.parent.mkdir()
    lonely.write_text(json.dumps({"images": []}))
    with pytest.raises(ConfigError, match="no image folder for coco split 'x'"):
        build_source(SourceConfig(kind="coco", annotations=lonely))
    assert isinstance(build_source(SourceConfig(kind="coco", annotations=lonely, image_dir=tmp_path)), CocoSource)


def test_vg_img2dataset_and_folder_builds(tmp_path, image_bytes) -> None:
    (tmp_path / "vg").mkdir()
    (tmp_path / "vg" / "region_descriptions.json").write_text("[]")
    vg = build_source(SourceConfig(path=tmp_path / "vg"))
    assert isinstance(vg, VisualGenomeSource) and vg.image_dir == tmp_path / "vg"
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.jpg").write_bytes(image_bytes())
    assert isinstance(build_source(SourceConfig(path=tmp_path / "pics")), FolderSource)
    assert isinstance(build_source(SourceConfig(kind="img2dataset", path=tmp_path / "pics")), Img2DatasetSource)


def test_missing_fields_raise_config_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="source.path .* is required"):
        build_source(SourceConfig())
    with pytest.raises(ConfigError, match="source.path is required for source kind folder"):
        build_source(SourceConfig(kind="folder"))
    with pytest.raises(ConfigError, match="is not a directory"):
        build_source(SourceConfig(kind="img2dataset", path=tmp_path / "missing"))
    with pytest.raises(ConfigError, match="region descriptions file .* does not exist"):
        build_source(SourceConfig(kind="vg", path=tmp_path))
