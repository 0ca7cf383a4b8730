"""Helpers shared by the model-backed annotators (transformers and open_clip backends).

- ``resolve_device`` / ``resolve_dtype`` / ``chunks``: re-exported from ``annotators._devices``.
- ``check_model_path`` / ``from_pretrained``: clear ``AnnotatorError`` for a missing path or a non-model folder.
- ``clean_texts`` / ``clean_pairs``: strip, drop empty, dedup on ``caption_key`` (order kept);
  ``generation_kwargs``: checked ``generate`` settings.
- ``ImageTextGenerator``: ``AutoModelForImageTextToText`` + ``AutoProcessor`` chat-prompted batched generation
  (left padding); ``VlmBackend``: the base of the backends that prompt one (the ``vlm`` captioner, the
  ``vlm-box`` region captioner), with their tiny LLaVA (``write_tiny_llava``). ``engine: vllm`` swaps the
  generator for ``annotators.vllm_engine.VllmGenerator`` (same prompts, vLLM's engine; ``ENGINES``).
- ``PretrainedVisionBackend``: the base of the transformers image backends (``hf`` detector, ``mask2former``).
- Tiny random models: ``TINY_TOWER`` (layer sizes), ``token_config`` (a tokenizer's vocabulary size and special
  ids), ``save_tiny`` (init from seed 0 and ``save_pretrained`` with the processor).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from annotators._devices import (  # noqa: F401 - chunks re-exported
    VisionBackend,
    chunks,
    existing_path,
    looks_like_local_path,
    resolve_device,
    resolve_dtype,
    seeded,
)
from annotators.base import AnnotatorError, Backend
from annotators.prompts import PromptChoice, caption_key
from annotators.shared_prefix import SHARED_PREFIX_MODEL_TYPES

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


def clean_pairs(pairs: Iterable[tuple[str, str | None]]) -> list[tuple[str, str | None]]:
    """``(text, prompt)`` pairs with whitespace collapsed, empty texts dropped and duplicates (same
    ``caption_key``: case and punctuation ignored) dropped; first-seen order and prompt kept."""
    seen: dict[str, tuple[str, str | None]] = {}
    for text, prompt in pairs:
        text = " ".join(text.split())
        if text:
            seen.setdefault(caption_key(text), (text, prompt))
    return list(seen.values())


def clean_texts(texts: Sequence[str]) -> list[str]:
    """Strip whitespace, drop empty strings and duplicates (``caption_key``), keep first-seen order."""
    return [text for text, _ in clean_pairs((t, None) for t in texts)]


def check_generation(num_beams: int, num_return_sequences: int, generate_kwargs: Mapping[str, Any]) -> None:
    """Greedy/beam search returns at most ``num_beams`` sequences per input; sampling may return any number."""
    if num_beams < 1 or num_return_sequences < 1:
        raise AnnotatorError(f"num_beams ({num_beams}) and num_return_sequences ({num_return_sequences}) must be >= 1")
    if num_return_sequences > num_beams and not generate_kwargs.get("do_sample", False):
        raise AnnotatorError(
            f"num_return_sequences ({num_return_sequences}) > num_beams ({num_beams}) needs "
            "generate_kwargs: {do_sample: true}"
        )


def generation_kwargs(
    max_new_tokens: int, num_beams: int, num_return_sequences: int, generate_kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """The keyword arguments of ``model.generate``, checked (``check_generation``); ``generate_kwargs`` win."""
    check_generation(num_beams, num_return_sequences, generate_kwargs)
    return {
        "max_new_tokens": max_new_tokens,
        "num_beams": num_beams,
        "num_return_sequences": num_return_sequences,
        **dict(generate_kwargs),
    }


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
        shared_prefix: bool = True,
    ) -> None:
        self.gen_kwargs = generation_kwargs(max_new_tokens, num_beams, num_return_sequences, generate_kwargs)
        self.shared_prefix = bool(shared_prefix)
        self.model_path = model
        self.num_return_sequences = num_return_sequences
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
        inputs = self.processor(images=list(images), text=self.chat_texts(prompts), padding=True, return_tensors="pt")
        inputs = inputs.to(self.device, self.dtype)
        with torch.inference_mode():
            output_ids = self.model.generate(**inputs, **self.gen_kwargs)
        n_prompt = 0 if self.model.config.is_encoder_decoder else inputs["input_ids"].shape[1]
        return decode_generated(self.processor, output_ids, n_prompt, len(prompts), self.num_return_sequences)

    def chat_texts(self, prompts: Sequence[str]) -> list[str]:
        """Each prompt as one user turn (image, then text) in the chat template, ready for the assistant's answer."""
        conversations = [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}] for prompt in prompts
        ]
        return self.processor.apply_chat_template(conversations, add_generation_prompt=True)

    @property
    def shares_prefix(self) -> bool:
        """Whether ``generate_jobs`` reuses each image's prefix (``shared_prefix`` and a supported model type)."""
        return self.shared_prefix and self.model.config.model_type in SHARED_PREFIX_MODEL_TYPES

    def generate_jobs(self, images: Sequence[Any], jobs: Sequence[tuple[int, str]], batch_size: int) -> list[list[str]]:
        """``(image index, prompt)`` jobs -> per job ``num_return_sequences`` decoded texts, ``batch_size`` jobs per
        ``generate``: from each image's shared prefix (``annotators/shared_prefix.py``) when ``shares_prefix``,
        else job by job (each job with its full image and prompt)."""
        if self.model is None:
            raise AnnotatorError("call load() before generating")
        if not jobs:
            return []
        if not self.shares_prefix:
            texts: list[list[str]] = []
            for batch in chunks(list(jobs), batch_size):
                texts += self.generate([images[i] for i, _ in batch], [p for _, p in batch])
            return texts
        return self._generate_shared(images, jobs, batch_size)

    def _generate_shared(self, images: Sequence[Any], jobs: Sequence[tuple[int, str]], batch_size: int) -> list:
        """The shared-prefix path: each used image preprocessed once (with its first job's text, which fixes its
        number of image tokens), every job's text tokenised with that many image tokens, then ``generate_shared``
        with a prefill that runs the model (vision tower included) on the prefixes of a set of images."""
        import torch

        from annotators.shared_prefix import PrefixJobs, generate_shared, prefix_rows

        texts = self.chat_texts([p for _, p in jobs])
        used = sorted({i for i, _ in jobs})
        first = {i: next(j for j, (k, _) in enumerate(jobs) if k == i) for i in used}
        encoded = self.processor(images=[images[i] for i in used], text=[texts[first[i]] for i in used],
                                 padding=True, return_tensors="pt")
        row_of = {i: r for r, i in enumerate(used)}
        image_id = self.processor.image_token_id
        n_image_tokens = {i: int((encoded["input_ids"][row_of[i]] == image_id).sum()) for i in used}
        tokenizer = self.processor.tokenizer
        # the image token is a special token: tokenise each text with one, then repeat it as the processor does
        rows = [expand_token(ids, image_id, n_image_tokens[i])
                for (i, _), ids in zip(jobs, tokenizer(texts, add_special_tokens=True)["input_ids"], strict=True)]
        for i in used:  # the text-only tokenisation must give the processor's own tokens
            mask = encoded["attention_mask"][row_of[i]].bool()
            if encoded["input_ids"][row_of[i]][mask].tolist() != rows[first[i]]:
                raise AnnotatorError(f"{self.model_path}: shared_prefix cannot reproduce the processor's tokens; set "
                                     "shared_prefix: false for this model")
        pixels = {k: v for k, v in encoded.items() if k not in ("input_ids", "attention_mask")}

        def prefill(new: list[int], ids: Any, mask: Any, positions: Any) -> list:
            picked = torch.tensor([row_of[i] for i in new])
            extra = {k: v[picked].to(self.device, self.dtype if v.is_floating_point() else v.dtype)
                     for k, v in pixels.items()}
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
            return prefix_rows(out.cache)

        new_tokens = generate_shared(
            PrefixJobs(rows=rows, image_of=[i for i, _ in jobs]), prefill=prefill, model=self.model,
            gen_kwargs=self.gen_kwargs, pad_id=tokenizer.pad_token_id, batch_size=batch_size, device=self.device,
        )
        return [self.processor.batch_decode(t, skip_special_tokens=True) for t in new_tokens]


def expand_token(ids: Sequence[int], token_id: int, n: int) -> list[int]:
    """``ids`` with every ``token_id`` repeated ``n`` times (a processor's image placeholder -> its image tokens)."""
    out: list[int] = []
    for t in ids:
        out += [t] * n if t == token_id else [t]
    return out


# The generators a ``VlmBackend`` can run on (``engine`` config key), as "module:Class" so vLLM's module loads lazily.
ENGINES = {
    "hf": "annotators._hf:ImageTextGenerator",
    "vllm": "annotators.vllm_engine:VllmGenerator",
}


def engine_class(engine: str) -> type:
    """The generator class of ``engine`` (a key of ``ENGINES``); ``AnnotatorError`` naming the known ones."""
    import importlib

    if engine not in ENGINES:
        raise AnnotatorError(f"unknown engine {engine!r}; known: {', '.join(sorted(ENGINES))}")
    module_name, _, class_name = ENGINES[engine].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


class VlmBackend(Backend):
    """Base of the backends that prompt one ``ImageTextGenerator`` (``prompts``: a ``PromptChoice``), ``batch_size``
    inputs a call.

    A subclass keeps its own keyword-only ``__init__`` (its config keys and their defaults) and passes them
    on here; ``version`` is the model path (plus `` (vllm)`` on that engine), ``create_tiny`` writes the tiny
    LLaVA. ``engine`` picks the generator (``ENGINES``): ``hf`` (transformers, this process) or ``vllm``
    (``annotators/vllm_engine.py``: the same prompts through vLLM, whose ``LLM`` takes ``engine_kwargs``).
    """

    def __init__(
        self,
        *,
        model: str,
        prompts: PromptChoice,
        max_new_tokens: int,
        num_beams: int,
        num_return_sequences: int,
        generate_kwargs: Mapping[str, Any] | None,
        device: str,
        dtype: str,
        batch_size: int,
        shared_prefix: bool = True,
        engine: str = "hf",
        engine_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        extra = {}
        if engine_kwargs is not None:
            if engine == "hf":
                raise AnnotatorError("engine_kwargs configure an engine's own runtime; engine hf takes none")
            extra["engine_kwargs"] = engine_kwargs
        self.generator = engine_class(engine)(
            model=model,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            num_return_sequences=num_return_sequences,
            generate_kwargs=generate_kwargs or {},
            device=device,
            dtype=dtype,
            shared_prefix=shared_prefix,
            **extra,
        )
        self.engine = engine
        self.prompts, self.batch_size = prompts, batch_size

    @classmethod
    def create_tiny(cls, out_dir: str | Path) -> dict[str, Any]:
        write_tiny_llava(out_dir)
        return {"backend": cls.name, "model": str(out_dir), "max_new_tokens": 6}

    @property
    def version(self) -> str:
        return self.generator.model_path if self.engine == "hf" else f"{self.generator.model_path} ({self.engine})"

    def load(self) -> None:
        self.generator.load()


# A LLaVA-1.5-style chat template ("USER: <image>\n{text}\nASSISTANT:") for the tiny VLM.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


# A 2-layer, 2-head transformer of width 32 (MLP 64): the towers of the tiny test models.
TINY_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def token_config(tokenizer: Any) -> dict[str, int]:
    """The text-config keys a language model takes from its ``tokenizer``: vocabulary size and special ids."""
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def save_tiny(model_cls: Any, config: Any, processor: Any, out_dir: str | Path) -> None:
    """A ``model_cls(config)`` initialised from seed 0, saved with ``processor`` to ``out_dir``."""
    with seeded():
        model = model_cls(config).eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def write_tiny_llava(out_dir: str | Path, image_size: int = 32, patch_size: int = 8) -> None:
    """Save a random LLaVA (CLIP ViT ``image_size`` px / patch ``patch_size``, 2-layer Llama; width 32) with a
    ``LlavaProcessor`` (tiny BPE tokenizer, ``CLIPImageProcessor`` at ``image_size``, ``TINY_CHAT_TEMPLATE``) to
    ``out_dir``. Default: 16 image tokens; ``image_size=336, patch_size=14``: LLaVA-1.5's 576 image tokens."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from annotators.tiny_text import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(extra_special_tokens=["<image>"])
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    # (image_size / patch_size)^2 patches + CLS from the vision tower; the "default" strategy drops CLS -> that many
    # "<image>" tokens per image.
    n_image_tokens = (image_size // patch_size) ** 2
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=TINY_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    # initializer_range 0.2 (not 0.02): outputs then depend visibly on image and prompt, so batching bugs show.
    vision = CLIPVisionConfig(**TINY_TOWER, image_size=image_size, patch_size=patch_size, initializer_range=0.2)
    text = LlamaConfig(
        **TINY_TOWER,
        **token_config(tokenizer),
        num_key_value_heads=2,
        max_position_embeddings=max(256, n_image_tokens + 192),
        initializer_range=0.2,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    save_tiny(LlavaForConditionalGeneration, config, processor, out_dir)


class PretrainedVisionBackend(VisionBackend):
    """Base of the transformers image backends: a model and its processor from a local folder or hub id.

    ``version`` is ``model`` plus the hub commit of the loaded weights, when they came from the hub.
    """

    def __init__(self, *, model: str, device: str, dtype: str, batch_size: int) -> None:
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        self.model_id = str(model)
        self._processor: Any = None

    @property
    def version(self) -> str:
        revision = getattr(self._model.config, "_commit_hash", None) if self._model is not None else None
        return f"{self.model_id}:{revision[:12]}" if revision else self.model_id

    def _from_pretrained(self, processor_cls: Any, model_cls: Any, *, folder: str, label: str) -> tuple[Any, Any]:
        """``(processor, model)`` of ``model_id``, the model in ``_dtype`` (not moved). A missing local ``folder``
        (e.g. "detector model directory") or a failed load raises ``AnnotatorError`` (``cannot load {label}: ...``)."""
        if looks_like_local_path(self.model_id):
            existing_path(self.model_id, folder)
        try:
            processor = processor_cls.from_pretrained(self.model_id)
            model = model_cls.from_pretrained(self.model_id, dtype=self._dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise AnnotatorError(f"cannot load {label}: {exc}") from exc
        return processor, model
