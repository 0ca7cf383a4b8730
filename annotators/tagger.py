"""Image taggers (DESIGN.md "Annotation stages" 1): ``images -> list[list[Tag]]``, best tag first.

- ``ClipVocabTagger`` (``clip-vocab``): the portable backend. Zero-shot open_clip scoring of every image against
  ``prompt.format(tag=...)`` for each tag of a vocabulary file; the vocabulary's text embeddings are computed once
  in ``load()``. Score = ``(cosine + 1) / 2`` so it lies in [0, 1] as ``Tag.score`` requires (a monotone map of the
  cosine, not a probability: no softmax over the vocabulary, so tags do not compete). Keep the ``top_k`` best
  with ``score >= threshold``. CLIP cosines of matching pairs are typically 0.2-0.35, i.e. scores 0.60-0.68.
- ``RamTagger`` (``ram``): Recognize Anything (RAM / RAM++, the paper's tagger); optional package.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from annotators._hf import chunks, resolve_device, resolve_dtype
from annotators.base import AnnotatorError, Backend, require
from annotators.scorer import OpenClipBackend
from data_schemas import Tag

logger = logging.getLogger(__name__)

DEFAULT_VOCAB = Path(__file__).parent / "vocab" / "default_vocab.txt"
RAM_EXTRA = (
    "RAM is not on PyPI; use the CUDA worker image (docker/Dockerfile.cuda), which runs "
    "`pip install git+https://github.com/xinyu1205/recognize-anything`"
)


def read_vocab(path: str | Path) -> list[str]:
    """One tag per line; blank lines and ``#`` comments skipped, duplicates dropped (first kept)."""
    path = Path(path)
    if not path.is_file():
        raise AnnotatorError(f"tag vocabulary {path} does not exist")
    tags = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    tags = list(dict.fromkeys(t for t in tags if t and not t.startswith("#")))
    if not tags:
        raise AnnotatorError(f"tag vocabulary {path} is empty")
    return tags


class ClipVocabTagger(OpenClipBackend):
    """Zero-shot open_clip tagger over a fixed vocabulary (see module docstring for the score)."""

    kind: ClassVar[str] = "tagger"
    name: ClassVar[str] = "clip-vocab"

    def __init__(
        self,
        *,
        model: str,
        pretrained: str | None = None,
        model_config: str | None = None,
        vocab: str | None = None,
        prompt: str = "a photo of a {tag}",
        threshold: float = 0.6,
        top_k: int = 10,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 32,
    ) -> None:
        if "{tag}" not in prompt:
            raise AnnotatorError(f"clip-vocab prompt {prompt!r} needs a '{{tag}}' placeholder")
        if top_k < 1:
            raise AnnotatorError(f"clip-vocab top_k must be >= 1, got {top_k}")
        super().__init__(
            model=model, pretrained=pretrained, model_config=model_config, device=device, dtype=dtype,
            batch_size=batch_size,
        )
        self.vocab_path = Path(vocab) if vocab is not None else DEFAULT_VOCAB
        self.prompt, self.threshold, self.top_k = prompt, threshold, top_k
        self.tags: list[str] = []
        self.tag_feats: Any = None  # (V, D) float32, L2-normalised

    @property
    def version(self) -> str:
        return f"{self.encoder.version}+{self.vocab_path.name}"

    def load(self) -> None:
        self.tags = read_vocab(self.vocab_path)
        super().load()
        prompts = [self.prompt.format(tag=tag) for tag in self.tags]
        self.tag_feats = self.encoder.encode_texts(prompts, batch_size=256)
        logger.info("clip-vocab: %d tags from %s", len(self.tags), self.vocab_path)

    def __call__(self, images: Sequence[Image.Image]) -> list[list[Tag]]:
        """Per image at most ``top_k`` tags with ``score >= threshold``, sorted by score (descending)."""
        import torch

        if self.tag_feats is None:
            raise AnnotatorError("call load() before tagging")
        image_feats = self.encoder.encode_images(images, self.batch_size)  # (N, D)
        scores = (image_feats @ self.tag_feats.T + 1.0) / 2.0  # (N, V) in [0, 1]
        k = min(self.top_k, len(self.tags))
        top_scores, top_idx = torch.topk(scores, k, dim=1)
        out = []
        for row_scores, row_idx in zip(top_scores.cpu().tolist(), top_idx.cpu().tolist(), strict=True):
            out.append(
                [
                    Tag(name=self.tags[j], score=min(max(s, 0.0), 1.0), annotator=self.name)
                    for s, j in zip(row_scores, row_idx, strict=True)
                    if s >= self.threshold
                ]
            )
        return out


class RamTagger(Backend):
    """Recognize Anything (``variant: ram_plus | ram``) from the ``recognize-anything`` package (lazy import).

    Batched through ``model.generate_tag`` (what ``ram.inference_ram`` calls, but that helper returns only the
    first image's tags). RAM thresholds per class internally; ``Tag.score`` is the sigmoid of the tagging head's
    logit for that class, read with a forward hook on ``model.fc`` (the head's last layer).
    """

    kind: ClassVar[str] = "tagger"
    name: ClassVar[str] = "ram"

    def __init__(
        self,
        *,
        checkpoint: str,
        variant: str = "ram_plus",
        vit: str = "swin_l",
        image_size: int = 384,
        device: str = "auto",
        dtype: str = "float32",
        batch_size: int = 16,
    ) -> None:
        if variant not in ("ram_plus", "ram"):
            raise AnnotatorError(f"ram variant must be 'ram_plus' or 'ram', got {variant!r}")
        self.checkpoint, self.variant, self.vit, self.image_size = checkpoint, variant, vit, image_size
        self.device_name, self.dtype_name, self.batch_size = device, dtype, batch_size
        self.model: Any = None

    @classmethod
    def create_tiny(cls, out_dir: str | Path) -> dict[str, Any]:
        require("ram", RAM_EXTRA)
        raise AnnotatorError(
            "ram has no offline tiny model: RAM builds its text tokenizer from the hub (bert-base-uncased) and "
            "its heads from fixed 4585-tag files; test it in the CUDA image with the released checkpoint"
        )

    @property
    def version(self) -> str:
        return f"{self.variant}:{Path(self.checkpoint).name}"

    def load(self) -> None:
        models = require("ram.models", RAM_EXTRA)
        transform_module = require("ram.transform", RAM_EXTRA)
        if not Path(self.checkpoint).is_file():
            raise AnnotatorError(f"RAM checkpoint {self.checkpoint} does not exist")
        self.device = resolve_device(self.device_name)
        self.dtype = resolve_dtype(self.dtype_name, self.device)
        build = getattr(models, self.variant)
        model = build(pretrained=self.checkpoint, image_size=self.image_size, vit=self.vit)
        self.model = model.eval().to(self.device, self.dtype)
        self.transform = transform_module.get_transform(image_size=self.image_size)
        self._tag_index = {tag: i for i, tag in enumerate(self.model.tag_list)}
        logger.info("loaded %s from %s on %s", self.variant, self.checkpoint, self.device)

    def __call__(self, images: Sequence[Image.Image]) -> list[list[Tag]]:
        import torch

        if self.model is None:
            raise AnnotatorError("call load() before tagging")
        captured: list[Any] = []
        hook = self.model.fc.register_forward_hook(lambda _m, _i, out: captured.append(out))
        out: list[list[Tag]] = []
        try:
            for batch in chunks(images, self.batch_size):
                pixels = torch.stack([self.transform(im) for im in batch]).to(self.device, self.dtype)
                captured.clear()
                with torch.inference_mode():
                    tag_strings, _ = self.model.generate_tag(pixels)
                probs = torch.sigmoid(captured[-1].float().squeeze(-1)).cpu()  # (B, num_class)
                for b, text in enumerate(tag_strings):
                    names = [t.strip() for t in text.split("|") if t.strip()]
                    tags = [Tag(name=n, score=float(probs[b, self._tag_index[n]]), annotator=self.name) for n in names]
                    out.append(sorted(tags, key=lambda t: -t.score))
        finally:
            hook.remove()
        return out
