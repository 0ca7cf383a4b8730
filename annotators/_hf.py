"""Helpers shared by the model-backed annotators (transformers and open_clip backends).

- ``config_kwargs`` / ``resolve_device`` / ``resolve_dtype`` / ``chunks``: re-exported from ``annotators._devices``.
- ``check_model_path`` / ``from_pretrained``: clear ``AnnotatorError`` for a missing path or a non-model folder.
- ``chunks``: fixed-size batches; ``clean_texts``: strip, drop empty, dedup (order kept).
- ``ImageTextGenerator``: ``AutoModelForImageTextToText`` + ``AutoProcessor`` chat-prompted batched generation
  (left padding), shared by the ``vlm`` captioner and the ``vlm-box`` region captioner.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from annotators._devices import chunks, config_kwargs, resolve_device, resolve_dtype  # noqa: F401 - re-exported
from annotators.base import AnnotatorError

logger = logging.getLogger(__name__)


def check_model_path(path: str | Path, *, marker: str = "config.json") -> str:
    """Validate a local model folder (must hold ``marker``); hub ids (``org/name``) pass through unchanged.

    A string is taken as a local path when it exists, is absolute, or starts with ``.`` or ``~``.
    """
    text = str(path)
    local = Path(text).expanduser()
    if local.exists() or local.is_absolute() or text.startswith((".", "~")):
        if not local.exists():
            raise AnnotatorError(f"model path {text} does not exist")
        if not local.is_dir() or not (local / marker).is_file():
            raise AnnotatorError(f"model path {text} is not a model folder (no {marker} in it)")
        return str(local)
    return text


def from_pretrained(loader: Any, path: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(path, **kwargs)`` with failures re-raised as ``AnnotatorError`` naming ``path``."""
    try:
        return loader.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise AnnotatorError(f"cannot load {getattr(loader, '__name__', loader)} from {path}: {exc}") from exc


def clean_texts(texts: Sequence[str]) -> list[str]:
    """Strip whitespace, drop empty strings and duplicates, keep first-seen order."""
    seen: dict[str, None] = {}
    for text in texts:
        text = " ".join(text.split())
        if text:
            seen.setdefault(text, None)
    return list(seen)


def check_generation(num_beams: int, num_return_sequences: int, generate_kwargs: Mapping[str, Any]) -> None:
    """Greedy/beam search returns at most ``num_beams`` sequences per input; sampling may return any number."""
    if num_beams < 1 or num_return_sequences < 1:
        raise AnnotatorError(f"num_beams ({num_beams}) and num_return_sequences ({num_return_sequences}) must be >= 1")
    if num_return_sequences > num_beams and not generate_kwargs.get("do_sample", False):
        raise AnnotatorError(
            f"num_return_sequences ({num_return_sequences}) > num_beams ({num_beams}) needs "
            "generate_kwargs: {do_sample: true}"
        )


def decode_generated(
    processor: Any, output_ids: Any, n_prompt_tokens: int, n_inputs: int, n_return: int
) -> list[list[str]]:
    """Decode ``output_ids`` (n_inputs * n_return, L) after the prompt into ``n_inputs`` lists of ``n_return`` texts."""
    texts = processor.batch_decode(output_ids[:, n_prompt_tokens:], skip_special_tokens=True)
    if len(texts) != n_inputs * n_return:
        raise RuntimeError(f"generate returned {len(texts)} sequences for {n_inputs} inputs x {n_return}")
    return [texts[i * n_return : (i + 1) * n_return] for i in range(n_inputs)]


class ImageTextGenerator:
    """Chat-prompted batched generation with an ``AutoModelForImageTextToText`` checkpoint (LLaVA, Qwen2-VL, ...).

    Each input is one image with one user prompt, rendered by the processor's chat template as
    ``[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]`` with the
    generation prompt appended; prompts are left-padded so a batch decodes like its inputs one by one.
    """

    def __init__(
        self,
        *,
        model: str,
        max_new_tokens: int,
        num_beams: int,
        num_return_sequences: int,
        generate_kwargs: Mapping[str, Any],
        device: str,
        dtype: str,
    ) -> None:
        check_generation(num_beams, num_return_sequences, generate_kwargs)
        self.model_path = model
        self.num_return_sequences = num_return_sequences
        self.gen_kwargs = {
            "max_new_tokens": max_new_tokens,
            "num_beams": num_beams,
            "num_return_sequences": num_return_sequences,
            **dict(generate_kwargs),
        }
        self.device_name, self.dtype_name = device, dtype
        self.model: Any = None
        self.processor: Any = None

    def load(self) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = check_model_path(self.model_path)
        self.device = resolve_device(self.device_name)
        self.dtype = resolve_dtype(self.dtype_name, self.device)
        self.processor = from_pretrained(AutoProcessor, path)
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model = from_pretrained(AutoModelForImageTextToText, path, dtype=self.dtype).to(self.device).eval()
        self.gen_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        logger.info("loaded %s on %s (%s)", path, self.device, self.dtype)

    def generate(self, images: Sequence[Any], prompts: Sequence[str]) -> list[list[str]]:
        """One forward ``generate`` over ``len(images)`` (image, prompt) pairs -> per pair ``num_return_sequences``
        decoded texts (raw: not stripped or deduplicated)."""
        import torch

        if self.model is None:
            raise AnnotatorError("call load() before generating")
        conversations = [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}] for prompt in prompts
        ]
        texts = self.processor.apply_chat_template(conversations, add_generation_prompt=True)
        inputs = self.processor(images=list(images), text=texts, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device, self.dtype)
        with torch.inference_mode():
            output_ids = self.model.generate(**inputs, **self.gen_kwargs)
        n_prompt = 0 if self.model.config.is_encoder_decoder else inputs["input_ids"].shape[1]
        return decode_generated(self.processor, output_ids, n_prompt, len(prompts), self.num_return_sequences)
