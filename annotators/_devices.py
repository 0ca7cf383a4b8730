"""Device, dtype and batching plumbing shared by the model backends.

``resolve_device("auto" | "cpu" | "cuda" | "cuda:1")`` and ``resolve_dtype("float32" | "float16" |
"bfloat16", device)`` turn config strings into torch objects with errors that name the bad value;
``existing_path`` names a missing file or folder; ``move_inputs`` sends processor outputs to the model's
device and dtype; ``seeded`` makes the random init of a tiny model reproducible. ``VisionBackend`` is the
base of the batched image backends (``detector``, ``background``): device/dtype specs, ``batch_size``, load once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from annotators.base import AnnotatorError, Backend

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is the current CUDA device when one is visible, else CPU; ``"cuda:k"`` must exist."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = str(spec).strip().lower()
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise AnnotatorError(f"unknown device {spec!r}; use 'auto', 'cpu', 'cuda' or 'cuda:<index>'") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise AnnotatorError(
                f"device {spec!r} requested but CUDA is not available here (torch {torch.__version__}, built for "
                f"CUDA {torch.version.cuda}; CUDA_VISIBLE_DEVICES={visible!r}); not falling back to the CPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise AnnotatorError(f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise AnnotatorError(f"unsupported device {spec!r}; use 'auto', 'cpu', 'cuda' or 'cuda:<index>'")
    return device


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """Model dtype from its config name.

    ``"auto"`` is bfloat16 on CUDA (float16 without bf16 support) and float32 on CPU. ``float16``
    needs CUDA (CPU half kernels are missing or slow).
    """
    if isinstance(name, torch.dtype):
        dtype = name
    else:
        key = str(name).strip().lower().removeprefix("torch.")
        if key == "auto":
            if device.type != "cuda":
                return torch.float32
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if key not in DTYPES:
            raise AnnotatorError(f"unknown dtype {name!r}; use 'auto' or one of {', '.join(DTYPES)}")
        dtype = DTYPES[key]
    if dtype == torch.float16 and device.type != "cuda":
        raise AnnotatorError("dtype float16 needs a CUDA device; use float32 or bfloat16 on CPU")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise AnnotatorError(f"dtype bfloat16 is not supported by {device}; use float16 or float32")
    return dtype


def existing_path(path: str | Path, what: str) -> Path:
    """``path`` as a ``Path``; raises ``AnnotatorError`` naming ``what`` and the path when it does not exist."""
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise AnnotatorError(f"{what} not found: {resolved}")
    return resolved


def looks_like_local_path(model: str) -> bool:
    """True for ``/abs``, ``./rel``, ``../rel``, ``~/x`` or an existing path; False for a hub id ``org/name``."""
    return model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists()


def read_names(source: str | Path | Sequence[str], what: str) -> list[str]:
    """Class names from a list, or from a file: JSON list, or text with one name per line (blank lines skipped)."""
    if isinstance(source, (str, Path)):
        path = existing_path(source, f"{what} file")
        text = path.read_text(encoding="utf-8")
        names = json.loads(text) if path.suffix == ".json" else [line.strip() for line in text.splitlines()]
    else:
        names = list(source)
    names = [str(name).strip() for name in names if str(name).strip()]
    if not names:
        raise AnnotatorError(f"{what} is empty")
    return names


def move_inputs(inputs: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Tensors to ``device``; floating ones (pixel values) also to ``dtype``, integer ones (ids, masks) keep theirs."""
    moved = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device=device)
        moved[key] = value
    return moved


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """``items`` in consecutive pieces of at most ``size``."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    return [items[start : start + size] for start in range(0, len(items), size)]


def rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


@contextmanager
def seeded(seed: int = 0) -> Iterator[None]:
    """Random init on the CPU inside the block starts from ``seed`` (tiny test models); the caller's RNG state is
    left as it was (only the CPU generator is forked and seeded: CUDA is not initialised)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


class VisionBackend(Backend):
    """Base of the batched image backends: ``device`` / ``dtype`` config strings, ``batch_size`` images a pass.

    A subclass passes those three keys on from its own keyword-only ``__init__``; its ``load()`` returns at
    once when ``_model`` is set, calls ``_resolve_device()`` and sets ``_model`` last; its ``__call__`` is
    ``_in_chunks(images, run)``. ``model_label`` names the model in the not-loaded error.
    """

    model_label: ClassVar[str]

    def __init__(self, *, device: str, dtype: str, batch_size: int) -> None:
        if int(batch_size) < 1:
            raise AnnotatorError(f"{self.kind} batch_size must be >= 1, got {batch_size}")
        self.device_spec, self.dtype_spec, self.batch_size = device, dtype, int(batch_size)
        self._model: Any = None
        self._device: torch.device | None = None
        self._dtype: torch.dtype | None = None

    def _resolve_device(self) -> None:
        self._device = resolve_device(self.device_spec)
        self._dtype = resolve_dtype(self.dtype_spec, self._device)

    def _in_chunks(self, images: Sequence[Image.Image], run: Callable[[list[Image.Image]], list[Any]]) -> list[Any]:
        """``run`` on consecutive RGB chunks of at most ``batch_size`` images; its outputs concatenated, in order."""
        if self._model is None:
            raise AnnotatorError(f"{self.model_label} is not loaded: call load() first")
        outputs: list[Any] = []
        for chunk in chunks(list(images), self.batch_size):
            outputs.extend(run([rgb(image) for image in chunk]))
        return outputs
