"""Image captioners (DESIGN.md "Annotation stages" 2): ``images -> list[list[Caption]]``.

Every caption comes back stripped, deduplicated per image, empty ones dropped, ``kept=True`` and
``clip_score=None`` (the scorer stage fills those). Several captions per image: ``num_return_sequences``
(beam search returns the best ``num_return_sequences <= num_beams`` beams; with
``generate_kwargs: {do_sample: true, top_p: 0.9}`` any number).

- ``Blip2Captioner`` (``blip2``): ``Blip2ForConditionalGeneration`` + ``Blip2Processor`` (paper: BLIP-2, e.g.
  ``Salesforce/blip2-opt-2.7b``). An optional ``prompt`` conditions the language model; only the generated
  continuation is returned.
- ``VlmCaptioner`` (``vlm``): a Shikra-style chat VLM through ``AutoModelForImageTextToText`` + ``AutoProcessor``
  (e.g. ``llava-hf/llava-1.5-7b-hf``; Shikra's own delta checkpoints are not a transformers architecture, any
  image-text-to-text chat checkpoint with a chat template works), prompted with ``prompt`` in the chat template.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from annotators._hf import (
    ImageTextGenerator,
    check_generation,
    check_model_path,
    chunks,
    clean_texts,
    config_kwargs,
    decode_generated,
    from_pretrained,
    resolve_device,
    resolve_dtype,
)
from annotators.base import AnnotatorError
from data_schemas import Caption

logger = logging.getLogger(__name__)

# A LLaVA-1.5-style chat template ("USER: <image>\n{text}\nASSISTANT:") for the tiny VLM.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def to_captions(texts_per_image: Sequence[Sequence[str]], annotator: str) -> list[list[Caption]]:
    """Raw generated texts per image -> cleaned ``Caption`` lists (stripped, deduplicated, no empties)."""
    return [[Caption(text=t, annotator=annotator) for t in clean_texts(texts)] for texts in texts_per_image]


class Blip2Captioner:
    """BLIP-2 captions: one ``generate`` per chunk of ``batch_size`` images."""

    kind: ClassVar[str] = "captioner"
    name: ClassVar[str] = "blip2"

    def __init__(
        self,
        *,
        model: str,
        prompt: str | None = None,
        max_new_tokens: int = 30,
        num_beams: int = 3,
        num_return_sequences: int = 1,
        generate_kwargs: Mapping[str, Any] | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
    ) -> None:
        generate_kwargs = dict(generate_kwargs or {})
        check_generation(num_beams, num_return_sequences, generate_kwargs)
        self.model_path, self.prompt, self.batch_size = model, prompt or "", batch_size
        self.num_return_sequences = num_return_sequences
        self.gen_kwargs = {
            "max_new_tokens": max_new_tokens,
            "num_beams": num_beams,
            "num_return_sequences": num_return_sequences,
            **generate_kwargs,
        }
        self.device_name, self.dtype_name = device, dtype
        self.model: Any = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Blip2Captioner:
        return cls(**config_kwargs(cls, cfg))

    @classmethod
    def create_tiny(cls, out_dir: str | Path) -> dict[str, Any]:
        write_tiny_blip2(out_dir)
        return {
            "backend": cls.name,
            "model": str(out_dir),
            "max_new_tokens": 6,
            "num_beams": 2,
            "num_return_sequences": 2,
        }

    @property
    def version(self) -> str:
        return self.model_path

    def load(self) -> None:
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        path = check_model_path(self.model_path)
        self.device = resolve_device(self.device_name)
        self.dtype = resolve_dtype(self.dtype_name, self.device)
        self.processor = from_pretrained(Blip2Processor, path)
        self.model = from_pretrained(Blip2ForConditionalGeneration, path, dtype=self.dtype).to(self.device).eval()
        n_query = self.model.config.num_query_tokens
        if self.processor.num_query_tokens != n_query:
            # Without matching image placeholder tokens the query outputs never reach the language model.
            raise AnnotatorError(
                f"{path}: processor num_query_tokens {self.processor.num_query_tokens} != model's {n_query}"
            )
        self.gen_kwargs.setdefault("pad_token_id", self.processor.tokenizer.pad_token_id)
        logger.info("loaded blip2 %s on %s (%s)", path, self.device, self.dtype)

    def __call__(self, images: Sequence[Image.Image]) -> list[list[Caption]]:
        import torch

        if self.model is None:
            raise AnnotatorError("call load() before captioning")
        texts: list[list[str]] = []
        for batch in chunks(images, self.batch_size):
            batch = [im.convert("RGB") for im in batch]
            inputs = self.processor(images=batch, text=[self.prompt] * len(batch), return_tensors="pt")
            inputs = inputs.to(self.device, self.dtype)
            with torch.inference_mode():
                output_ids = self.model.generate(**inputs, **self.gen_kwargs)
            # Decoder-only LMs return prompt + continuation, encoder-decoder (Flan-T5) only the continuation.
            n_prompt = inputs["input_ids"].shape[1] if self.model.config.use_decoder_only_language_model else 0
            texts += decode_generated(self.processor, output_ids, n_prompt, len(batch), self.num_return_sequences)
        return to_captions(texts, self.name)


class VlmCaptioner:
    """Chat-VLM captions: ``prompt`` per image, one left-padded ``generate`` per chunk of ``batch_size`` images."""

    kind: ClassVar[str] = "captioner"
    name: ClassVar[str] = "vlm"

    def __init__(
        self,
        *,
        model: str,
        prompt: str = "Describe the image briefly.",
        max_new_tokens: int = 40,
        num_beams: int = 1,
        num_return_sequences: int = 1,
        generate_kwargs: Mapping[str, Any] | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
    ) -> None:
        self.generator = ImageTextGenerator(
            model=model,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            num_return_sequences=num_return_sequences,
            generate_kwargs=generate_kwargs or {},
            device=device,
            dtype=dtype,
        )
        self.prompt, self.batch_size = prompt, batch_size

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> VlmCaptioner:
        return cls(**config_kwargs(cls, cfg))

    @classmethod
    def create_tiny(cls, out_dir: str | Path) -> dict[str, Any]:
        write_tiny_llava(out_dir)
        return {"backend": cls.name, "model": str(out_dir), "max_new_tokens": 6}

    @property
    def version(self) -> str:
        return self.generator.model_path

    def load(self) -> None:
        self.generator.load()

    def __call__(self, images: Sequence[Image.Image]) -> list[list[Caption]]:
        texts: list[list[str]] = []
        for batch in chunks(images, self.batch_size):
            texts += self.generator.generate([im.convert("RGB") for im in batch], [self.prompt] * len(batch))
        return to_captions(texts, self.name)


def write_tiny_blip2(out_dir: str | Path) -> None:
    """Save a random BLIP-2 (ViT 32 px / patch 8, 2-layer Q-Former with 4 queries, 2-layer OPT; width 32) and its
    processor (tiny BPE tokenizer + ``BlipImageProcessor`` at 32x32) to ``out_dir``."""
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
    )

    from annotators.tiny_text import build_tiny_tokenizer

    n_query = 4
    tokenizer = build_tiny_tokenizer()
    # The processor adds the "<image>" placeholder token to the tokenizer; the LM vocab must include it.
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        num_query_tokens=n_query,
    )
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    vision = Blip2VisionConfig(**small, image_size=32, patch_size=8)
    qformer = Blip2QFormerConfig(**small, vocab_size=len(tokenizer), cross_attention_frequency=1)
    text = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=n_query,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Blip2ForConditionalGeneration(config).eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def write_tiny_llava(out_dir: str | Path) -> None:
    """Save a random LLaVA (CLIP ViT 32 px / patch 8, 2-layer Llama; width 32) with a ``LlavaProcessor`` (tiny BPE
    tokenizer, ``CLIPImageProcessor`` at 32x32, ``TINY_CHAT_TEMPLATE``) to ``out_dir``."""
    import torch
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
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    # 16 patches + CLS from the vision tower; the "default" strategy drops CLS -> 16 "<image>" tokens per image.
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=TINY_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    # initializer_range 0.2 (not 0.02): outputs then depend visibly on image and prompt, so batching bugs show.
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        initializer_range=0.2,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
