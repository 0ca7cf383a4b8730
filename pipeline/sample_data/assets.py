"""Bundled inputs of the digit scenes: ``load_digits`` glyphs, ``skimage.data`` photos, the digit-sample split.

Nothing here downloads: ``sklearn.datasets.load_digits`` and the chosen ``skimage.data`` photos ship
inside the installed wheels. Both are cached per process.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.sample_data.config import BACKGROUND_LOADERS, SPLITS


@dataclass(frozen=True, eq=False)
class DigitBank:
    """The 1,797 ``load_digits`` samples: ``images`` (N, 8, 8) float64 in [0, 16], ``labels`` (N,) int64."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@functools.lru_cache(maxsize=1)
def load_digit_bank() -> DigitBank:
    """Load the handwritten digits bundled with scikit-learn (read-only arrays)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float64)
    labels = np.asarray(digits.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return DigitBank(images=images, labels=labels)


@functools.cache
def load_background(label: str) -> np.ndarray:
    """The photo named ``label`` (a ``BACKGROUND_LOADERS`` key) as read-only RGB uint8 (H, W, 3)."""
    import skimage.data

    if label not in BACKGROUND_LOADERS:
        raise KeyError(f"unknown background {label!r}; choose from {sorted(BACKGROUND_LOADERS)}")
    photo = np.asarray(getattr(skimage.data, BACKGROUND_LOADERS[label])())
    if photo.dtype != np.uint8:
        raise TypeError(f"skimage.data.{BACKGROUND_LOADERS[label]} is {photo.dtype}, expected uint8")
    if photo.ndim == 2:
        photo = np.repeat(photo[:, :, None], 3, axis=2)
    rgb = np.ascontiguousarray(photo[:, :, :3])
    rgb.setflags(write=False)
    return rgb


def split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n`` items by ``fractions`` with the largest-remainder rule (ties go to the earlier split).

    The counts sum to ``n`` exactly and each differs from ``n * fraction`` by less than 1.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    exact = [n * f for f in fractions]
    counts = [int(np.floor(x)) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def split_digit_samples(labels: np.ndarray, fractions: Mapping[str, float], seed: int) -> dict[str, np.ndarray]:
    """Partition sample indices into disjoint per-split pools, stratified by class.

    Each class's indices are shuffled with ``PCG64(seed)`` and cut by ``fractions``, so val and test
    scenes are drawn from handwritten samples no train scene uses.

    Args:
        labels: (N,) digit class of every sample.
        fractions: split name -> share (``SPLITS`` order is used).
        seed: the generation seed.
    Returns:
        split name -> sorted (M_split,) int64 sample indices; the pools partition ``range(N)``.
    """
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x5EED])))
    shares = [fractions[split] for split in SPLITS]
    pools: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for digit in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == digit))
        bounds = np.cumsum([0, *split_counts(len(members), shares)])
        for split, start, stop in zip(SPLITS, bounds[:-1], bounds[1:], strict=True):
            pools[split].append(members[start:stop])
    return {split: np.sort(np.concatenate(parts)).astype(np.int64) for split, parts in pools.items()}
