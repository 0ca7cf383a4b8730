"""Scaffolding shared by the annotator tests.

Every backend is tested the same way: its ``create_tiny`` writes a tiny random model, ``load(kind, cfg,
**overrides)`` builds that config through the registry and loads it, and the tests check shapes, batching
and errors on random images (``images``, ``make_images``), never model quality. Tests marked ``gpu`` are
skipped on a machine without CUDA.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import annotators

SIZES = [(64, 48), (100, 100), (37, 81)]  # (width, height): landscape, square, portrait


def random_images(sizes: Sequence[tuple[int, int]] = SIZES, seed: int = 0) -> list[Image.Image]:
    """Uniform-noise RGB images of ``sizes`` (width, height), reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)) for w, h in sizes]


def build_and_load(kind: str, cfg: Mapping[str, Any], **overrides: Any) -> Any:
    backend = annotators.build(kind, {**cfg, **overrides})
    backend.load()
    return backend


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs CUDA")


@pytest.fixture(scope="session")
def make_images():
    """``make_images(sizes=SIZES, seed=0)``: random RGB images of the given (width, height) sizes."""
    return random_images


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Three random RGB images of ``SIZES``."""
    return random_images()


@pytest.fixture(scope="session")
def load():
    """``load(kind, cfg, **overrides)``: the ``kind`` backend built from ``cfg`` updated by ``overrides``, loaded."""
    return build_and_load


@pytest.fixture(scope="module")
def blip2_cfg(tmp_path_factory) -> dict:
    """A tiny BLIP-2 captioner config on CPU."""
    from annotators.captioner import Blip2Captioner

    return Blip2Captioner.create_tiny(tmp_path_factory.mktemp("tiny_blip2")) | {"device": "cpu"}


@pytest.fixture(scope="module")
def vlm_cfg(tmp_path_factory) -> dict:
    """A tiny LLaVA ``vlm`` captioner config on CPU."""
    from annotators.captioner import VlmCaptioner

    return VlmCaptioner.create_tiny(tmp_path_factory.mktemp("tiny_vlm")) | {"device": "cpu"}
