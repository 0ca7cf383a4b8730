"""Digit scenes: ``load_digits`` handwritten digits on ``skimage.data`` photos, with exact annotations.

See docs/sample_data.md. The entry point is ``generate_sample(out_dir, n, seed, config)``.
"""

from pipeline.sample_data.config import BACKGROUND_LOADERS, DEFAULT_PALETTE, SPLITS, SampleConfig
from pipeline.sample_data.generate import SampleSummary, SplitSummary, generate_sample, image_file_name, scene_for
from pipeline.sample_data.scenes import Placement, Scene

__all__ = [
    "BACKGROUND_LOADERS",
    "DEFAULT_PALETTE",
    "SPLITS",
    "Placement",
    "SampleConfig",
    "SampleSummary",
    "Scene",
    "SplitSummary",
    "generate_sample",
    "image_file_name",
    "scene_for",
]
