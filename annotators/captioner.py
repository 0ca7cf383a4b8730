"""Image captioners (DESIGN.md "Annotation stages" 2): ``images -> list[list[Caption]]``.

Every caption comes back stripped, deduplicated per image (``caption_key``: case and punctuation ignored), empty
ones dropped, ``kept=True``, ``clip_score=None`` (the scorer stage fills those) and ``prompt`` set to the prompt it
answered. Several captions per image: ``num_return_sequences`` (beam search returns the best
``num_return_sequences <= num_beams`` beams; with ``generate_kwargs: {do_sample: true, top_p: 0.9}`` any number),
and ``prompts`` + ``prompts_per_image``: that many distinct prompts drawn per image from a prompt set (built-in
``blip2_image`` / ``shikra_image``, a file, or a list; ``annotators/prompts``), seeded by ``seed`` and the image's
content, each answered separately. ``prompt`` instead gives every image one fixed prompt.

- ``Blip2Captioner`` (``blip2``): ``Blip2ForConditionalGeneration`` + ``Blip2Processor`` (paper: BLIP-2, e.g.
  ``Salesforce/blip2-opt-2.7b``). A prompt conditions the language model (left-padded in a batch); only the
  generated continuation is returned. With an OPT language model each image's query tokens + shared prompt
  prefix are computed once for all its prompts (``shared_prefix``, ``annotators/shared_prefix.py``).
- ``VlmCaptioner`` (``vlm``): a Shikra-style chat VLM through ``AutoModelForImageTextToText`` + ``AutoProcessor``
  (e.g. ``llava-hf/llava-1.5-7b-hf``; Shikra's own delta checkpoints are not a transformers architecture, any
  image-text-to-text chat checkpoint with a chat template works), prompted in the chat template; LLaVA models
  encode each image once for all its prompts (``shared_prefix``); ``engine: vllm`` runs the same prompts through
  vLLM (``annotators/vllm_engine.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from annotators._hf import (  # noqa: F401 - TINY_CHAT_TEMPLATE, write_tiny_llava re-exported
    TINY_CHAT_TEMPLATE,
    TINY_TOWER,
    VlmBackend,
    check_model_path,
    chunks,
    clean_pairs,
    decode_generated,
    from_pretrained,
    generation_kwargs,
    resolve_device,
    resolve_dtype,
    save_tiny,
    token_config,
    write_tiny_llava,
)
from annotators.base import AnnotatorError, Backend
from annotators.prompts import PromptChoice, image_digest
from data_schemas import Caption

logger = logging.getLogger(__name__)


def to_captions(
    pairs_per_image: Sequence[Sequence[tuple[str, str | None]]], annotator: str
) -> list[list[Caption]]:
    """Raw ``(text, prompt)`` pairs per image -> cleaned ``Caption`` lists (stripped, deduplicated on
    ``caption_key``, no empties), each with the prompt it answered."""
    return [[Caption(text=t, annotator=annotator, prompt=p) for t, p in clean_pairs(pairs)]
            for pairs in pairs_per_image]


def prompt_jobs(images: Sequence[Image.Image], choice: PromptChoice) -> list[tuple[int, str]]:
    """``(image index, prompt)`` for every prompt each image gets (sampled by the image's content)."""
    return [(i, p) for i, image in enumerate(images) for p in choice.for_item(image_digest(image))]


def gather(n_images: int, jobs: Sequence[tuple[int, str]], texts: Sequence[Sequence[str]],
           recorded: Sequence[str | None]) -> list[list[tuple[str, str | None]]]:
    """Generated ``texts`` per job -> ``(text, prompt)`` pairs per image; ``recorded[j]`` is the prompt to record."""
    pairs: list[list[tuple[str, str | None]]] = [[] for _ in range(n_images)]
    for (i, _), job_texts, prompt in zip(jobs, texts, recorded, strict=True):
        pairs[i] += [(t, prompt) for t in job_texts]
    return pairs


class Blip2Captioner(Backend):
    """BLIP-2 captions: one ``generate`` per chunk of ``batch_size`` images."""

    kind: ClassVar[str] = "captioner"
    name: ClassVar[str] = "blip2"

    def __init__(
        self,
        *,
        model: str,
        prompt: str | None = None,
        prompts: str | list[str] | None = None,
        prompts_per_image: int = 1,
        seed: int = 0,
        max_new_tokens: int = 30,
        num_beams: int = 3,
        num_return_sequences: int = 1,
        generate_kwargs: Mapping[str, Any] | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        shared_prefix: bool = True,
    ) -> None:
        self.gen_kwargs = generation_kwargs(max_new_tokens, num_beams, num_return_sequences, generate_kwargs or {})
        self.shared_prefix = bool(shared_prefix)
        self.prompts = PromptChoice(prompt, prompts, prompts_per_image, seed, default="")
        self.model_path, self.batch_size = model, batch_size
        self.num_return_sequences = num_return_sequences
        self.device_name, self.dtype_name = device, dtype
        self.model: Any = None

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
        self.processor.tokenizer.padding_side = "left"  # prompts of different lengths in one decoder-only batch
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
        rgb = [im.convert("RGB") for im in images]
        jobs = prompt_jobs(rgb, self.prompts)
        if self.shares_prefix:
            texts = self._generate_shared(rgb, jobs)
            return to_captions(gather(len(rgb), jobs, texts, [p or None for _, p in jobs]), self.name)
        texts: list[list[str]] = []
        for batch in chunks(jobs, self.batch_size):
            inputs = self.processor(images=[rgb[i] for i, _ in batch], text=[p for _, p in batch], padding=True,
                                    return_tensors="pt")
            inputs = inputs.to(self.device, self.dtype)
            with torch.inference_mode():
                output_ids = self.model.generate(**inputs, **self.gen_kwargs)
            # Decoder-only LMs return prompt + continuation, encoder-decoder (Flan-T5) only the continuation.
            n_prompt = inputs["input_ids"].shape[1] if self.model.config.use_decoder_only_language_model else 0
            texts += decode_generated(self.processor, output_ids, n_prompt, len(batch), self.num_return_sequences)
        return to_captions(gather(len(rgb), jobs, texts, [p or None for _, p in jobs]), self.name)

    @property
    def shares_prefix(self) -> bool:
        """``shared_prefix`` with a decoder-only language model (OPT; Flan-T5 reads the prompt bidirectionally)."""
        return self.shared_prefix and bool(self.model.config.use_decoder_only_language_model)

    def _generate_shared(self, rgb: list[Image.Image], jobs: list[tuple[int, str]]) -> list[list[str]]:
        """Each image through the vision tower and Q-Former once; its prefix (query tokens + BOS + the text its
        prompts share) filled once in the language model; every job continues from it
        (``annotators/shared_prefix.py``). Rows as ``Blip2Processor`` makes them: ``num_query_tokens`` image
        tokens, then the tokenised prompt."""
        import torch

        from annotators.shared_prefix import PrefixJobs, generate_shared, prefix_rows

        if not jobs:
            return []
        used = sorted({i for i, _ in jobs})
        first = {i: next(j for j, (k, _) in enumerate(jobs) if k == i) for i in used}
        encoded = self.processor(images=[rgb[i] for i in used], text=[jobs[first[i]][1] for i in used],
                                 padding=True, return_tensors="pt")
        image_id, n_query = self.model.config.image_token_id, self.model.config.num_query_tokens
        rows = [[image_id] * n_query + ids for ids in self.processor.tokenizer([p for _, p in jobs])["input_ids"]]
        for r, i in enumerate(used):  # the text-only tokenisation must give the processor's own tokens
            if encoded["input_ids"][r][encoded["attention_mask"][r].bool()].tolist() != rows[first[i]]:
                raise AnnotatorError(f"{self.model_path}: shared_prefix cannot reproduce Blip2Processor's tokens; "
                                     "set shared_prefix: false")
        row_of = {i: r for r, i in enumerate(used)}
        language_model = self.model.language_model

        def prefill(new: list[int], ids: Any, mask: Any, positions: Any) -> list:
            pixels = encoded["pixel_values"][[row_of[i] for i in new]].to(self.device, self.dtype)
            queries = self.model.get_image_features(pixels).pooler_output  # (n, num_query_tokens, hidden)
            embeds = self.model.get_input_embeddings()(ids)
            embeds = embeds.masked_scatter((ids == image_id).unsqueeze(-1), queries.to(embeds.dtype))
            out = language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
            return prefix_rows(out.cache)

        new_tokens = generate_shared(
            PrefixJobs(rows=rows, image_of=[i for i, _ in jobs]), prefill=prefill, model=language_model,
            gen_kwargs=self.gen_kwargs, pad_id=self.processor.tokenizer.pad_token_id, batch_size=self.batch_size,
            device=self.device,
        )
        return [self.processor.batch_decode(t, skip_special_tokens=True) for t in new_tokens]


class VlmCaptioner(VlmBackend):
    """Chat-VLM captions: ``prompt`` per image, one left-padded ``generate`` per chunk of ``batch_size`` images."""

    kind: ClassVar[str] = "captioner"
    name: ClassVar[str] = "vlm"

    def __init__(
        self,
        *,
        model: str,
        prompt: str | None = None,
        prompts: str | list[str] | None = None,
        prompts_per_image: int = 1,
        seed: int = 0,
        max_new_tokens: int = 40,
        num_beams: int = 1,
        num_return_sequences: int = 1,
        generate_kwargs: Mapping[str, Any] | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        shared_prefix: bool = True,
        engine: str = "hf",
        engine_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            model=model, prompts=PromptChoice(prompt, prompts, prompts_per_image, seed, "Describe the image briefly."),
            max_new_tokens=max_new_tokens, num_beams=num_beams, num_return_sequences=num_return_sequences,
            generate_kwargs=generate_kwargs, device=device, dtype=dtype, batch_size=batch_size,
            shared_prefix=shared_prefix, engine=engine, engine_kwargs=engine_kwargs,
        )

    def __call__(self, images: Sequence[Image.Image]) -> list[list[Caption]]:
        rgb = [im.convert("RGB") for im in images]
        jobs = prompt_jobs(rgb, self.prompts)
        texts = self.generator.generate_jobs(rgb, jobs, self.batch_size)
        return to_captions(gather(len(rgb), jobs, texts, [p for _, p in jobs]), self.name)


def write_tiny_blip2(out_dir: str | Path) -> None:
    """Save a random BLIP-2 (ViT 32 px / patch 8, 2-layer Q-Former with 4 queries, 2-layer OPT; width 32) and its
    processor (tiny BPE tokenizer + ``BlipImageProcessor`` at 32x32) to ``out_dir``."""
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
    vision = Blip2VisionConfig(**TINY_TOWER, image_size=32, patch_size=8)
    qformer = Blip2QFormerConfig(**TINY_TOWER, vocab_size=len(tokenizer), cross_attention_frequency=1)
    text = OPTConfig(
        **token_config(tokenizer),
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
    )
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=n_query,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    save_tiny(Blip2ForConditionalGeneration, config, processor, out_dir)
