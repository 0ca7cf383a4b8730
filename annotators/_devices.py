"""Device, dtype and config plumbing shared by the vision backends (detector, segmenter, background).

``resolve_device("auto" | "cpu" | "cuda" | "cuda:1")`` and ``resolve_dtype("float32" | "float16" |
"bfloat16", device)`` turn config strings into torch objects with errors that name the bad value;
``config_kwargs`` validates a backend's config against its keyword-only ``__init__``; ``existing_path`` names a missing file or folder;
``move_inputs`` sends processor outputs to the model's device and dtype.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from annotators.base import AnnotatorError

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
            raise AnnotatorError(f"device {spec!r} requested but CUDA is not available on this machine")
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
