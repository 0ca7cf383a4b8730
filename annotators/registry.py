"""Config -> backend resolution. Entries are ``"module:Class"`` strings so heavy imports stay lazy.

Contract (like detectron2's registries): every entry is a class with ``from_config(cfg: Mapping)``
returning an unloaded backend; ``build(kind, cfg)`` looks up ``cfg["backend"]`` under ``kind``.
Adding a backend = one line here (or ``register`` at runtime) + its class. ``oracle`` (every kind but scorer and
background) is a test instrument: ground truth with controlled noise (annotators/oracle.py), not a model.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from annotators.base import KINDS, AnnotatorError

_ENTRIES: dict[str, dict[str, str]] = {
    "tagger": {
        "clip-vocab": "annotators.tagger:ClipVocabTagger",
        "ram": "annotators.tagger:RamTagger",
        "oracle": "annotators.oracle:OracleTagger",
    },
    "captioner": {
        "blip2": "annotators.captioner:Blip2Captioner",
        "vlm": "annotators.captioner:VlmCaptioner",
        "oracle": "annotators.oracle:OracleCaptioner",
    },
    "scorer": {
        "open_clip": "annotators.scorer:OpenClipScorer",
    },
    "detector": {
        "hf": "annotators.detector:HfDetector",
        "vitdet": "annotators.detector:ViTDetDetector",
        "oracle": "annotators.oracle:OracleDetector",
    },
    "region_captioner": {
        "vlm-box": "annotators.region_captioner:VlmBoxCaptioner",
        "crop": "annotators.region_captioner:CropCaptioner",
        "gpt4roi": "annotators.region_captioner_gpt4roi:Gpt4RoiCaptioner",
        "oracle": "annotators.oracle:OracleRegionCaptioner",
    },
    "segmenter": {
        "sam": "annotators.segmenter:SamSegmenter",
        "oracle": "annotators.oracle:OracleSegmenter",
    },
    "background": {
        "mask2former": "annotators.background:Mask2FormerBackground",
        "maskdino": "annotators.background:MaskDinoBackground",
    },
}
assert set(_ENTRIES) == set(KINDS)


def register(kind: str, backend: str, target: str) -> None:
    """Register ``target`` (``"package.module:Class"``) as ``backend`` of ``kind``."""
    if kind not in _ENTRIES:
        raise AnnotatorError(f"unknown annotator kind {kind!r}; kinds: {', '.join(KINDS)}")
    _ENTRIES[kind][backend] = target


def backends(kind: str) -> list[str]:
    return sorted(_ENTRIES.get(kind, {}))


def resolve(kind: str, backend: str) -> type:
    """The backend class (imports its module)."""
    try:
        target = _ENTRIES[kind][backend]
    except KeyError:
        known = ", ".join(backends(kind)) or "none"
        raise AnnotatorError(f"no {kind} backend {backend!r}; known {kind} backends: {known}") from None
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def build(kind: str, cfg: Mapping[str, Any]) -> Any:
    """Build (not load) the backend named by ``cfg["backend"]`` with the rest of ``cfg``."""
    if "backend" not in cfg:
        raise AnnotatorError(f"{kind} config needs a 'backend' key; known: {', '.join(backends(kind))}")
    return resolve(kind, cfg["backend"]).from_config(cfg)
