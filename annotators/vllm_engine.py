"""vLLM as the generation engine of the chat-VLM backends (``engine: vllm`` on ``vlm`` / ``vlm-box``).

The Hugging Face path shares each image's prefix by hand (``annotators/shared_prefix.py``); vLLM does it in its
engine: with ``enable_prefix_caching`` it hashes every KV-cache block by its tokens, the blocks before it and the
image that fills its placeholder tokens, so every (box x prompt) request of one image reuses the blocks of the
image tokens + chat template computed by the first, and its multimodal processor cache (``mm_processor_cache_gb``,
on by default) keeps the preprocessed image. All requests of a call go to ``LLM.generate`` at once, and vLLM's
scheduler batches them by tokens (``max_num_seqs`` / ``max_num_batched_tokens`` in ``engine_kwargs``; the
backend's ``batch_size`` does not apply).

The prompts are the HF path's, built by the same code: ``ImageTextGenerator.chat_texts`` (the processor's chat
template, one image placeholder that vLLM expands to the image's tokens), the box-in-prompt text and prompt choice
of the backend that owns this generator; each request carries its image (padded to square when the box format
says so, as the HF path gives it) as ``multi_modal_data``. Greedy decoding is ``temperature=0``; sampling maps
``do_sample`` / ``temperature`` / ``top_p`` / ``top_k`` / ``repetition_penalty``; beam search (``num_beams > 1``)
is refused (vLLM has it only as a separate API).

Numerics: vLLM runs its own kernels (paged / flash attention, fused MLPs, bf16 accumulation in another order,
batch-dependent reductions), so its greedy tokens may differ from ``transformers``' on the same weights where two
candidates are within rounding of each other; expect most captions equal and the rest to diverge after a
near-tie, not the exact equality the HF shared-prefix path keeps with the HF per-job path (docs/annotators.md).

vLLM pins its own torch and transformers: it runs in its own stage environment (``/opt/vllm-venv`` of
``docker/Dockerfile.cuda``; ``runtime_env: {py_executable: /opt/vllm-venv/bin/python}`` on the stage, as in
``configs/umg41m.yaml``). Without it ``load()`` raises ``MissingDependencyError`` saying so.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from annotators._devices import resolve_device, resolve_dtype
from annotators._hf import ImageTextGenerator, check_model_path, from_pretrained
from annotators.base import AnnotatorError, require

logger = logging.getLogger(__name__)

VLLM_EXTRA = ("the vllm engine runs in its own stage environment: /opt/vllm-venv of docker/Dockerfile.cuda "
              "(requirements/vllm-venv.txt); give the stage runtime_env: {py_executable: /opt/vllm-venv/bin/python} "
              "(configs/umg41m.yaml), or use engine: hf")

# HF ``generate`` sampling settings -> vLLM ``SamplingParams`` fields of the same meaning.
SAMPLING_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                 "repetition_penalty": "repetition_penalty"}

# ``LLM`` settings this generator fixes itself; ``engine_kwargs`` may not override them.
FIXED_LLM_KEYS = frozenset({"model", "enable_prefix_caching", "limit_mm_per_prompt", "dtype"})


def sampling_kwargs(max_new_tokens: int, num_return_sequences: int, generate_kwargs: Mapping[str, Any]) -> dict:
    """``SamplingParams`` keyword arguments for HF-style settings: greedy (``temperature=0``) unless
    ``do_sample``; ``AnnotatorError`` naming any setting vLLM is not given here."""
    settings = dict(generate_kwargs)
    do_sample = bool(settings.pop("do_sample", False))
    unknown = sorted(set(settings) - set(SAMPLING_KEYS))
    if unknown:
        raise AnnotatorError(f"engine vllm: generate_kwargs {unknown} have no vLLM mapping here; supported: "
                             f"do_sample, {', '.join(sorted(SAMPLING_KEYS))}")
    out = {"max_tokens": max_new_tokens, "n": num_return_sequences}
    if not do_sample:
        return out | {"temperature": 0.0}
    return out | {"temperature": 1.0} | {SAMPLING_KEYS[k]: v for k, v in settings.items()}


class VllmGenerator(ImageTextGenerator):
    """The ``ImageTextGenerator`` interface (``load``, ``processor``, ``chat_texts``, ``generate_jobs``) on a
    ``vllm.LLM``. ``shared_prefix`` is vLLM's ``enable_prefix_caching``; ``engine_kwargs`` go to ``vllm.LLM``
    (e.g. ``gpu_memory_utilization``, ``max_model_len``, ``max_num_seqs``, ``tensor_parallel_size``). ``device``
    (``auto`` / ``cuda`` / ``cpu``, no index) only resolves ``dtype: auto`` as the HF path does; vLLM's build picks
    the platform and Ray's ``CUDA_VISIBLE_DEVICES`` the GPU."""

    def __init__(self, *, engine_kwargs: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        gen = self.gen_kwargs
        if gen["num_beams"] != 1:
            raise AnnotatorError(f"engine vllm: num_beams {gen['num_beams']} (beam search) is not supported; "
                                 "use num_beams: 1 (greedy) or generate_kwargs: {do_sample: true}, or engine: hf")
        extra = {k: v for k, v in gen.items() if k not in ("max_new_tokens", "num_beams", "num_return_sequences")}
        self.sampling = sampling_kwargs(gen["max_new_tokens"], gen["num_return_sequences"], extra)
        if self.device_name not in ("auto", "cuda", "cpu"):  # only the dtype rule's device: vLLM places the model
            raise AnnotatorError(f"engine vllm: device {self.device_name!r}; vLLM places the model itself (its "
                                 "build's platform, the GPUs Ray gives the actor): use device: auto, cuda or cpu")
        self.engine_kwargs = dict(engine_kwargs or {})
        fixed = sorted(FIXED_LLM_KEYS & set(self.engine_kwargs))
        if fixed:
            raise AnnotatorError(f"engine vllm: engine_kwargs {fixed} are set from the backend's own config "
                                 "(model, shared_prefix, dtype); remove them")
        self.llm: Any = None

    def load(self) -> None:
        """Import vLLM (``MissingDependencyError`` naming its stage environment when absent), load the processor
        (chat template, image geometry for box prompts) and the engine."""
        from transformers import AutoProcessor

        vllm = require("vllm", VLLM_EXTRA)
        path = check_model_path(self.model_path)
        self.dtype = resolve_dtype(self.dtype_name, resolve_device(self.device_name))  # the HF path's rule
        self.processor = from_pretrained(AutoProcessor, path)
        self.llm = vllm.LLM(
            model=path,
            enable_prefix_caching=self.shared_prefix,
            limit_mm_per_prompt={"image": 1},
            dtype=str(self.dtype).removeprefix("torch."),
            **self.engine_kwargs,
        )
        self.sampling_params = vllm.SamplingParams(**self.sampling)
        logger.info("loaded %s in vllm %s (%s, prefix caching %s)", path, getattr(vllm, "__version__", "?"),
                    self.dtype, self.shared_prefix)

    @property
    def shares_prefix(self) -> bool:
        return self.shared_prefix

    def generate(self, images: Sequence[Any], prompts: Sequence[str]) -> list[list[str]]:
        """(image, prompt) pairs -> per pair ``num_return_sequences`` texts, as ``ImageTextGenerator.generate``."""
        return self.generate_jobs(images, list(enumerate(prompts)), batch_size=len(prompts))

    def generate_jobs(self, images: Sequence[Any], jobs: Sequence[tuple[int, str]], batch_size: int) -> list[list[str]]:
        """``(image index, prompt)`` jobs -> per job ``num_return_sequences`` raw texts, in job order: one
        ``LLM.generate`` over all of them (``batch_size`` is vLLM's scheduler's business, unused)."""
        if self.llm is None:
            raise AnnotatorError("call load() before generating")
        if not jobs:
            return []
        texts = self.chat_texts([p for _, p in jobs])
        requests = [{"prompt": text, "multi_modal_data": {"image": images[i]}}
                    for (i, _), text in zip(jobs, texts, strict=True)]
        outputs = self.llm.generate(requests, self.sampling_params, use_tqdm=False)
        if len(outputs) != len(requests):
            raise RuntimeError(f"vllm returned {len(outputs)} outputs for {len(requests)} requests")
        return [[completion.text for completion in output.outputs] for output in outputs]
