"""The annotator contract shared by every kind (tagger, captioner, scorer, detector, ...).

Every backend is a class that:

- derives from ``Backend``: it is built from a plain config mapping by ``from_config(cfg)``, which checks the
  mapping against its keyword-only ``__init__`` (``config_kwargs``);
- loads its model once in ``load()`` (called by the worker that owns it, never at import or init);
- annotates a *batch* in ``__call__`` and returns one result per input, in order;
- names itself: ``name`` (the registry backend name) and ``version`` (what produced the output:
  model path or hub id and revision), recorded as ``provenance[stage] = f"{name}@{version}"``;
- provides ``create_tiny(out_dir) -> dict`` (a classmethod) that writes a tiny random-initialised
  model with the library's own config classes and returns the config that loads it — used by tests
  and by ``configs/smoke.yaml``; never used to fake a real model.

Annotators import only ``data_schemas`` (and their model libraries, lazily inside ``load``).
Images are PIL RGB images; boxes are ``float32`` arrays ``(N, 4)`` xyxy in pixels of that image.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Self, runtime_checkable

import numpy as np
from PIL import Image


class AnnotatorError(RuntimeError):
    """A backend cannot be built or loaded (bad config, missing files, missing optional package)."""


class MissingDependencyError(AnnotatorError):
    """An optional backend's package is not installed; the message names the extra / docker image."""


class WorkerLost(RuntimeError):
    """The process running a backend died (Ray actor killed, node lost). Not the image's fault:
    the stage chain re-raises it instead of turning it into error rows, so the shard is retried."""


@dataclass
class DetectorOutput:
    """Detections for one image: ``boxes_xyxy`` (N, 4) float32 pixels, ``scores`` (N,), ``labels`` (N)."""

    boxes_xyxy: np.ndarray
    scores: np.ndarray
    labels: list[str]

    def __post_init__(self) -> None:
        self.boxes_xyxy = np.asarray(self.boxes_xyxy, dtype=np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        if not (len(self.boxes_xyxy) == len(self.scores) == len(self.labels)):
            raise ValueError(
                f"detector output lengths differ: boxes {len(self.boxes_xyxy)}, scores {len(self.scores)}, "
                f"labels {len(self.labels)}"
            )


@dataclass
class SegmentOutput:
    """Masks for one image: ``masks`` (N, H, W) bool, ``scores`` (N,) float32 (model's own quality score), and
    ``stability`` (N,) float64 mean IoU under box jitter when the call was given jittered boxes, else None."""

    masks: np.ndarray
    scores: np.ndarray
    stability: np.ndarray | None = None


@dataclass
class StuffSegment:
    """One background segment: ``mask`` (H, W) bool with its class ``label`` and ``score``."""

    label: str
    mask: np.ndarray
    score: float = 1.0


@dataclass
class BackendInfo:
    name: str
    version: str
    extras: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Annotator(Protocol):
    """What every backend offers; per-kind call signatures are in ``annotators.kinds``."""

    kind: ClassVar[str]
    name: ClassVar[str]

    @property
    def version(self) -> str: ...

    def load(self) -> None: ...

    def __call__(self, *batch: Sequence[Any]) -> list[Any]: ...


def config_kwargs(cls: type, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``cls.__init__`` taken from ``cfg`` (minus ``backend``), validated.

    Raises ``AnnotatorError`` naming every unknown key (with the allowed ones) and missing required key.
    """
    params = {name: p for name, p in inspect.signature(cls.__init__).parameters.items() if p.kind is p.KEYWORD_ONLY}
    given = {key: value for key, value in cfg.items() if key != "backend"}
    label = f"{getattr(cls, 'kind', '?')} backend {getattr(cls, 'name', cls.__name__)!r}"
    unknown = sorted(set(given) - set(params))
    missing = sorted(name for name, p in params.items() if p.default is p.empty and name not in given)
    problems = []
    if unknown:
        problems.append(f"unknown config keys {unknown}")
    if missing:
        problems.append(f"missing required config keys {missing}")
    if problems:
        raise AnnotatorError(f"{label}: {'; '.join(problems)}; allowed: {sorted(params)}")
    return given


class Backend:
    """Base class of every registered backend: what ``annotators.registry.build`` calls.

    A subclass sets ``kind`` (one of ``KINDS``) and ``name`` (its registry backend name) and takes its whole
    config as keyword-only ``__init__`` parameters, with their defaults: that signature is the config schema.
    ``from_config`` validates a mapping against it and returns the backend, not loaded. A backend whose config
    holds more than plain values (e.g. the ``crop`` region captioner's nested captioner) overrides it.
    """

    kind: ClassVar[str]
    name: ClassVar[str]

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Self:
        """``cls(**cfg)`` without the ``backend`` key; ``AnnotatorError`` names unknown and missing keys."""
        return cls(**config_kwargs(cls, cfg))


# Per-kind batched call signatures (documentation + runtime checks in tests):
#   tagger(images)                      -> list[list[data_schemas.Tag]]
#   captioner(images)                   -> list[list[data_schemas.Caption]]        (kept=True, clip_score=None)
#   scorer(images, texts_per_image)     -> list[np.ndarray (T_i,)]                 (image-text cosine similarity)
#   detector(images)                    -> list[DetectorOutput]
#   region_captioner(images, boxes)     -> list[list[list[data_schemas.RegionCaption]]]   (per image, per box)
#   segmenter(images, boxes)            -> list[SegmentOutput]                     (one mask per box)
#   background(images)                  -> list[list[StuffSegment]]
KINDS = ("tagger", "captioner", "scorer", "detector", "region_captioner", "segmenter", "background")


def check_batch(images: Sequence[Image.Image], *others: Sequence[Any]) -> None:
    """Raise ``ValueError`` unless every per-image argument has one entry per image."""
    for other in others:
        if len(other) != len(images):
            raise ValueError(f"batch has {len(images)} images but {len(other)} entries of a per-image argument")


class BrokenDependencyError(AnnotatorError):
    """An optional backend's package is installed but fails to import (e.g. its pins conflict with this
    environment's: RAM under transformers 5); the message carries the real import error."""


def require(module: str, extra: str):
    """Import ``module``; raise ``MissingDependencyError`` (telling how to get it, ``extra``) when it, or its
    top-level package, is absent, and ``BrokenDependencyError`` with the real error when it is there but its
    own imports fail — a package that cannot import in this environment needs its own (a stage
    ``runtime_env``, docs/orchestration.md), not a reinstall."""
    import importlib
    import sys

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None)
        parts = module.split(".")
        if isinstance(exc, ModuleNotFoundError) and missing in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}:
            raise MissingDependencyError(f"{module} is not installed in {sys.executable}: {extra}") from exc
        raise BrokenDependencyError(
            f"{module} is installed in {sys.executable} but fails to import: {type(exc).__name__}: {exc}. "
            f"Its pins likely conflict with this environment's; run the stage in its own (stage runtime_env "
            f"py_executable / image_uri, docs/orchestration.md). {extra}") from exc
