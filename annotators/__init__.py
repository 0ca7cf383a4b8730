"""Annotation model backends, one module per kind, resolved from config by ``annotators.build``."""

from annotators.base import (
    AnnotatorError,
    BrokenDependencyError,
    DetectorOutput,
    MissingDependencyError,
    SegmentOutput,
    StuffSegment,
    WorkerLost,
)
from annotators.registry import backends, build, register

__all__ = [
    "AnnotatorError",
    "DetectorOutput",
    "MissingDependencyError",
    "BrokenDependencyError",
    "SegmentOutput",
    "StuffSegment",
    "WorkerLost",
    "backends",
    "build",
    "register",
]
