"""A stand-in for detectron2 (and maskdino) with the API surface the ``vitdet`` / ``maskdino`` backends use, so
their load and inference paths run without the real packages (not on PyPI).

Faithful where the backends could get it wrong: ``LazyConfig.load`` runs a Python config file and returns its
top-level variables as an attribute dict (detectron2 returns an omegaconf ``DictConfig``: ``.get`` and
attribute access); ``instantiate`` calls ``_target_`` with the other keys, recursively; ``CfgNode`` merges yaml
files and ``[KEY, VALUE]`` lists onto registered defaults and rejects unknown keys; models see
``{"image": (3, h, w) float tensor, "height", "width"}`` inputs and return per-image predictions at the
original size. ``install(monkeypatch)`` puts the modules into ``sys.modules``.
"""

from __future__ import annotations

import runpy
import sys
import types
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

SEEN: dict[str, Any] = {}  # what the fake models were given: image shapes, checkpoint, cfg flags


class Node(dict):
    """An omegaconf-like attribute dict."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


def _wrap(value: Any) -> Any:
    if isinstance(value, dict):
        return Node({k: _wrap(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


class LazyConfig:
    @staticmethod
    def load(path: str) -> Node:
        names = runpy.run_path(path)
        return _wrap({k: v for k, v in names.items() if not k.startswith("_") and isinstance(v, (dict, list))})

    @staticmethod
    def apply_overrides(cfg: Node, overrides: list[str]) -> Node:
        for override in overrides:
            key, value = override.split("=", 1)
            *parents, last = key.split(".")
            node = cfg
            for part in parents:
                node = node[part]
            node[last] = yaml.safe_load(value)
        return cfg


def instantiate(spec: Any) -> Any:
    if isinstance(spec, list):
        return [instantiate(s) for s in spec]
    if isinstance(spec, dict) and "_target_" in spec:
        kwargs = {k: instantiate(v) for k, v in spec.items() if k != "_target_"}
        return spec["_target_"](**kwargs)
    return spec


class ResizeShortestEdge:
    def __init__(self, short_edge_length: int | list[int], max_size: int) -> None:
        self.short = short_edge_length[0] if isinstance(short_edge_length, (list, tuple)) else short_edge_length
        self.max_size = max_size

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        h, w = pixels.shape[:2]
        scale = min(self.short / min(h, w), self.max_size / max(h, w))
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return np.asarray(Image.fromarray(pixels).resize(size))


class AugInput:
    def __init__(self, image: np.ndarray) -> None:
        self.image = image


class AugmentationList:
    def __init__(self, augs: list[Any]) -> None:
        self.augs = augs

    def __call__(self, aug_input: AugInput) -> None:
        for aug in self.augs:
            aug_input.image = aug.apply(aug_input.image)


class _Metadata(dict):
    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key, default)


class MetadataCatalog:
    registry = {"coco_2017_val": _Metadata(thing_classes=["person", "bicycle"],
                                           stuff_classes=["things", "sky", "grass"])}

    @classmethod
    def get(cls, name: str) -> _Metadata:
        return cls.registry.get(name, _Metadata())


class DetectionCheckpointer:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def load(self, path: str) -> None:
        SEEN["checkpoint"] = path


class _Boxes:
    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class _Instances:
    def __init__(self, boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor) -> None:
        self.pred_boxes, self.scores, self.pred_classes = _Boxes(boxes), scores, classes

    def to(self, device: str) -> _Instances:
        return self


class _FakeModel(torch.nn.Module):
    """Records the input image shapes; ``predict(height, width)`` gives one image's output at its original size."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        SEEN.setdefault("shapes", []).extend(tuple(item["image"].shape) for item in batch)
        # the dtype a layer computes in here (bf16 when the backend runs the model under autocast)
        SEEN.setdefault("compute_dtypes", []).append(torch.nn.functional.linear(torch.ones(1, 1), self.weight[None]).dtype)
        return [self.predict(item["height"], item["width"]) for item in batch]

    def predict(self, h: int, w: int) -> dict[str, Any]:
        raise NotImplementedError


class FakeViTDet(_FakeModel):
    """Two detections per image at its original size: class 1 (score 0.9) and class 0 (score 0.01)."""

    input_format = "RGB"

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.num_classes = num_classes

    def predict(self, h: int, w: int) -> dict[str, Any]:
        boxes = torch.tensor([[0.0, 0.0, w / 2, h / 2], [w / 4, h / 4, w + 5.0, h / 2]])
        return {"instances": _Instances(boxes, torch.tensor([0.9, 0.01]), torch.tensor([1, 0]))}


class CfgNode(Node):
    """yacs-like: keys must exist (registered by get_cfg / add_*_config) before a file or list sets them."""

    def merge_from_file(self, path: str) -> None:
        with open(path, encoding="utf-8") as handle:
            self._merge(self, yaml.safe_load(handle) or {}, "")

    def merge_from_list(self, pairs: list[str]) -> None:
        for key, value in zip(pairs[0::2], pairs[1::2], strict=True):
            *parents, last = key.split(".")
            node = self
            for part in parents:
                node = node[part]
            if last not in node:
                raise KeyError(f"Non-existent config key: {key}")
            node[last] = value

    def freeze(self) -> None:
        SEEN["frozen"] = True

    @classmethod
    def _merge(cls, node: dict, values: dict, prefix: str) -> None:
        for key, value in values.items():
            if key not in node:
                raise KeyError(f"Non-existent config key: {prefix}{key}")
            if isinstance(value, dict):
                cls._merge(node[key], value, f"{prefix}{key}.")
            else:
                node[key] = value


def get_cfg() -> CfgNode:
    return _cfg({"MODEL": {"DEVICE": "cuda", "WEIGHTS": ""}, "DATASETS": {"TRAIN": ["coco_2017_val"]},
                 "INPUT": {"MIN_SIZE_TEST": 800, "MAX_SIZE_TEST": 1333, "FORMAT": "BGR"}})


def _cfg(tree: dict) -> CfgNode:
    return CfgNode({k: _cfg(v) if isinstance(v, dict) else v for k, v in tree.items()})


def add_deeplab_config(cfg: CfgNode) -> None:
    cfg.SOLVER = _cfg({"POLY_LR_POWER": 0.9})


def add_maskdino_config(cfg: CfgNode) -> None:
    cfg.MODEL.MaskDINO = _cfg({"TEST": {"SEMANTIC_ON": True, "INSTANCE_ON": True, "PANOPTIC_ON": False}})


class FakeMaskDino(_FakeModel):
    """Panoptic output: left half "sky" (stuff class 1), right half a thing; records which heads were on."""

    def __init__(self, cfg: CfgNode) -> None:
        super().__init__()
        SEEN["maskdino_test"] = dict(cfg.MODEL.MaskDINO.TEST)

    def predict(self, h: int, w: int) -> dict[str, Any]:
        panoptic = torch.zeros(h, w, dtype=torch.int32)
        panoptic[:, : w // 2], panoptic[:, w // 2:] = 1, 2
        info = [{"id": 1, "category_id": 1, "isthing": False}, {"id": 2, "category_id": 0, "isthing": True}]
        return {"panoptic_seg": (panoptic, info)}


def install(monkeypatch) -> dict[str, Any]:
    """Put fake ``detectron2`` (+ submodules) and ``maskdino`` into ``sys.modules``; returns ``SEEN`` (cleared)."""
    SEEN.clear()
    modules = {
        "detectron2": {},
        "detectron2.config": {"LazyConfig": LazyConfig, "instantiate": instantiate, "get_cfg": get_cfg},
        "detectron2.checkpoint": {"DetectionCheckpointer": DetectionCheckpointer},
        "detectron2.data": {"MetadataCatalog": MetadataCatalog},
        "detectron2.data.transforms": {"ResizeShortestEdge": ResizeShortestEdge, "AugInput": AugInput,
                                       "AugmentationList": AugmentationList},
        "detectron2.modeling": {"build_model": FakeMaskDino},
        "detectron2.projects": {},
        "detectron2.projects.deeplab": {"add_deeplab_config": add_deeplab_config},
        "maskdino": {"add_maskdino_config": add_maskdino_config},
    }
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__path__ = []  # a package, so submodule imports resolve through sys.modules
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
    for name in modules:
        parent, _, child = name.rpartition(".")
        if parent:
            monkeypatch.setattr(sys.modules[parent], child, sys.modules[name], raising=False)
    return SEEN
