"""The detectron2 backends (``vitdet`` detector, ``maskdino`` background) start as configured, run on a fake
detectron2 (``fake_detectron2``: the real one is not on PyPI): test-time resize from the LazyConfig's
``dataloader.test.mapper``, class names from a file for datasets detectron2 does not know (BigDetection /
V3Det), LazyConfig overrides, only Mask DINO's panoptic head switched on; and the documented keys build."""

from __future__ import annotations

import re
from pathlib import Path

import fake_detectron2
import pytest
import torch
import yaml

import annotators

ROOT = Path(__file__).resolve().parents[2]
VITDET_CONFIG = """
from fake_detectron2 import FakeViTDet, ResizeShortestEdge
model = {{"_target_": FakeViTDet, "num_classes": 2}}
dataloader = {{"test": {{"dataset": {{"names": "{dataset}"}},
                         "mapper": {{"is_train": False, "augmentations": [
                             {{"_target_": ResizeShortestEdge, "short_edge_length": 32, "max_size": 48}}]}}}}}}
"""


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(fake_detectron2.__file__).parent))
    return fake_detectron2.install(monkeypatch)


def _vitdet(tmp_path: Path, dataset: str = "bigdet_val", **cfg):
    config_file = tmp_path / "vitdet.py"
    config_file.write_text(VITDET_CONFIG.format(dataset=dataset))
    (tmp_path / "m.pth").write_bytes(b"")
    return annotators.build("detector", {"backend": "vitdet", "config_file": str(config_file),
                                         "checkpoint": str(tmp_path / "m.pth"), "device": "cpu", **cfg})


def test_vitdet_uses_the_mapper_resize_and_class_names_from_a_file(fake, tmp_path, make_images):
    (tmp_path / "bigdet_classes.txt").write_text("zebra\nkite\n")
    detector = _vitdet(tmp_path, class_names=str(tmp_path / "bigdet_classes.txt"), threshold=0.05)
    detector.load()
    images = make_images([(64, 48), (37, 81)])
    outputs = detector(images)
    # dataloader.test.mapper.augmentations: shortest edge 32, longest 48 (not the 1024 fallback)
    assert fake["shapes"] == [(3, 32, 43), (3, 48, 22)]
    assert fake["checkpoint"] == str(tmp_path / "m.pth")
    assert [out.labels for out in outputs] == [["kite"], ["kite"]]  # class 1; the 0.01 box is under 0.05
    assert outputs[1].boxes_xyxy.tolist() == [[0.0, 0.0, 18.5, 40.5]]  # at the original size


def test_vitdet_overrides_and_the_test_size_fallback(fake, tmp_path, make_images):
    detector = _vitdet(tmp_path, class_names=["a", "b"], overrides=["dataloader.test.mapper.augmentations=[]"])
    detector.load()
    detector(make_images([(64, 48)]))
    assert fake["shapes"] == [(3, 48, 64)]  # the override emptied the test-time augmentations: no resize
    fake["shapes"].clear()
    (tmp_path / "vitdet.py").write_text("from fake_detectron2 import FakeViTDet\nmodel = {'_target_': FakeViTDet}\n")
    plain = annotators.build("detector", {"backend": "vitdet", "config_file": str(tmp_path / "vitdet.py"),
                                          "checkpoint": str(tmp_path / "m.pth"), "device": "cpu",
                                          "class_names": ["a", "b"], "test_size": 40})
    plain.load()
    plain(make_images([(64, 48)]))
    assert fake["shapes"] == [(3, 30, 40)]  # no mapper in the config: ResizeShortestEdge(test_size, test_size)


def test_vitdet_without_class_names_for_an_unregistered_dataset_is_a_clear_error(fake, tmp_path):
    with pytest.raises(annotators.AnnotatorError, match=r"no thing_classes for dataset 'bigdet_val'.*set class_names"):
        _vitdet(tmp_path).load()
    coco = _vitdet(tmp_path, dataset="coco_2017_val")  # a dataset detectron2 knows names itself
    coco.load()
    assert coco.class_names == ["person", "bicycle"]


def test_maskdino_runs_only_the_panoptic_head(fake, tmp_path, make_images):
    config_file = tmp_path / "maskdino.yaml"
    config_file.write_text(yaml.safe_dump({"INPUT": {"MIN_SIZE_TEST": 32, "MAX_SIZE_TEST": 48}}))
    (tmp_path / "m.pth").write_bytes(b"")
    background = annotators.build("background", {"backend": "maskdino", "config_file": str(config_file),
                                                 "checkpoint": str(tmp_path / "m.pth"), "device": "cpu"})
    background.load()
    assert fake["maskdino_test"] == {"SEMANTIC_ON": False, "INSTANCE_ON": False, "PANOPTIC_ON": True}
    segments = background(make_images([(64, 48)]))
    assert fake["shapes"] == [(3, 32, 43)]
    assert [(s.label, s.mask.shape, int(s.mask.sum())) for s in segments[0]] == [("sky", (48, 64), 48 * 32)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_dtype_reaches_the_detectron2_models_on_cpu(fake, tmp_path, make_images, dtype):
    """ViTDet and Mask DINO run under autocast in bf16 (weights stay float32): a layer inside the model computes
    in the configured dtype, on the CPU as on a GPU."""
    detector = _vitdet(tmp_path, class_names=["a", "b"], dtype=dtype)
    detector.load()
    detector(make_images([(64, 48)]))
    config_file = tmp_path / "maskdino.yaml"
    config_file.write_text(yaml.safe_dump({"INPUT": {"MIN_SIZE_TEST": 32, "MAX_SIZE_TEST": 48}}))
    background = annotators.build("background", {"backend": "maskdino", "config_file": str(config_file),
                                                 "checkpoint": str(tmp_path / "m.pth"), "device": "cpu",
                                                 "dtype": dtype})
    background.load()
    background(make_images([(64, 48)]))
    assert fake["compute_dtypes"] == [getattr(torch, dtype)] * 2


def _documented_backends() -> list[tuple[str, dict]]:
    text = (ROOT / "docs" / "annotators.md").read_text(encoding="utf-8")
    block = re.search(r"```yaml\n(build:\n.*?)```", text, re.S).group(1)
    annotate = yaml.safe_load(block)["build"]["annotate"]
    found = []
    for kind in ("tagger", "scorer", "segmenter", "background"):
        found.append((kind, annotate[kind]))
    for kind, group in (("captioner", "captioners"), ("detector", "detectors"),
                        ("region_captioner", "region_captioners")):
        found += [(kind, cfg) for cfg in annotate[group].values()]
    return found


@pytest.mark.parametrize(("kind", "cfg"), _documented_backends(), ids=lambda v: v if isinstance(v, str) else "")
def test_documented_backend_configs_are_accepted(kind, cfg):
    annotators.build(kind, cfg)  # builds (validates the keys); nothing is loaded


def test_umg41m_backend_configs_build_and_name_their_detector_classes():
    from data_schemas import load_config

    stages = load_config(ROOT / "configs" / "umg41m.yaml").annotate.model_stages()
    for stage, (kind, cfg) in stages.items():
        annotators.build(kind, cfg)  # every key is one the backend accepts
        if cfg["backend"] == "vitdet":
            assert cfg.get("class_names"), f"{stage}: BigDetection / V3Det need class_names"
