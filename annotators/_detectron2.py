"""What the detectron2 backends share (``vitdet`` detector, ``maskdino`` background).

detectron2 is not on PyPI (``DETECTRON2_HINT``) and is imported lazily, inside the functions that need it.
``Detectron2Backend`` holds the config/checkpoint pair and runs a batch ``DefaultPredictor``-style:
``detectron2_inputs`` resizes with the config's test augmentations (``detectron2_augment``), float16/bfloat16
run under ``torch.autocast`` (weights stay float32).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from annotators._devices import VisionBackend, rgb

DETECTRON2_HINT = (
    "detectron2 is not on PyPI; use the CUDA worker image built from docker/Dockerfile.cuda "
    "(or pip install 'git+https://github.com/facebookresearch/detectron2.git')"
)


def detectron2_inputs(
    images: Sequence[Image.Image], augment: Callable[[np.ndarray], np.ndarray], input_format: str
) -> list[dict[str, Any]]:
    """detectron2 model inputs, as ``DefaultPredictor`` builds them: resized ``(3, h, w)`` float32 + original size."""
    batch = []
    for image in images:
        pixels = np.asarray(rgb(image))
        if input_format == "BGR":
            pixels = pixels[:, :, ::-1]
        resized = augment(np.ascontiguousarray(pixels))
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)).astype(np.float32))
        batch.append({"image": tensor, "height": image.height, "width": image.width})
    return batch


def detectron2_augment(augmentations: Sequence[Any]) -> Callable[[np.ndarray], np.ndarray]:
    """``pixels (H, W, 3) uint8 -> resized`` through detectron2 ``AugmentationList`` (test-time transforms)."""
    from detectron2.data import transforms as T

    chain = T.AugmentationList(list(augmentations))

    def augment(pixels: np.ndarray) -> np.ndarray:
        aug_input = T.AugInput(pixels)
        chain(aug_input)
        return aug_input.image

    return augment


class Detectron2Backend(VisionBackend):
    """A detectron2 model from ``config_file`` with ``checkpoint`` weights, named by ``class_names``.

    Subclasses pass their config keys on to ``__init__``; their ``load()`` builds the model and sets
    ``_augment``, ``_input_format`` and ``class_names``; ``_predict(chunk)`` then gives the raw predictions.
    """

    def __init__(
        self,
        *,
        config_file: str,
        checkpoint: str,
        class_names: Sequence[str] | str | None,
        overrides: Sequence[str],
        device: str,
        dtype: str,
        batch_size: int,
    ) -> None:
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        self.config_file, self.checkpoint = str(config_file), str(checkpoint)
        self.class_names_source, self.overrides = class_names, list(overrides)
        self.class_names: list[str] = []
        self._augment: Callable[[np.ndarray], np.ndarray] | None = None
        self._input_format = "BGR"

    @property
    def version(self) -> str:
        return f"{Path(self.config_file).name}:{Path(self.checkpoint).name}"

    def _predict(self, images: list[Image.Image]) -> list[dict[str, Any]]:
        """The model's outputs for one chunk of images (one dict per image, in order)."""
        # bf16 / fp16 as autocast: detectron2 (and Mask DINO's ops) keep float32 weights; on the CPU autocast runs
        # bfloat16 (resolve_dtype refuses float16 there)
        autocast = self._dtype != torch.float32
        batch = detectron2_inputs(images, self._augment, self._input_format)
        with torch.inference_mode(), torch.autocast(self._device.type, dtype=self._dtype, enabled=autocast):
            return self._model(batch)
