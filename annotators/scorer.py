"""Image-text similarity scorers (caption filtering, DESIGN.md "Annotation stages" 2).

``OpenClipScorer`` (backend ``open_clip``) scores each image against its own list of texts with an open_clip
model: cosine similarity of L2-normalised embeddings, in [-1, 1]. The paper scores with EVA-CLIP; in open_clip
that is e.g. ``model: EVA02-L-14, pretrained: merged2b_s4b_b131k`` (or ``EVA02-E-14-plus`` /
``laion2b_s9b_b144k``), needing timm for the EVA towers. ``pretrained`` is an open_clip tag or a local
checkpoint file (.safetensors preferred; .pt/.bin are read with ``weights_only=True``).

``OpenClipEncoder`` holds the open_clip loading and batched encoding; ``OpenClipBackend`` (one encoder, its
config keys, ``load``/``version``/``create_tiny``) is the base of this scorer and of the ``clip-vocab`` tagger.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from annotators._hf import chunks, resolve_device, resolve_dtype
from annotators.base import AnnotatorError, Backend, check_batch

logger = logging.getLogger(__name__)

TINY_MODEL_NAME = "umg-tiny-clip"
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


class OpenClipEncoder:
    """An open_clip model with its eval transform and tokenizer; encodes images and texts in batches.

    ``model`` is a built-in open_clip name (``EVA02-L-14``), a ``local-dir:`` / ``hf-hub:`` spec, or the stem of
    ``model_config`` (a JSON model config registered with ``open_clip.add_model_config`` before creation).
    """

    def __init__(self, *, model: str, pretrained: str | None, model_config: str | None, device: str, dtype: str):
        if model_config is not None and Path(model_config).stem != model:
            raise AnnotatorError(f"model {model!r} must be the file stem of model_config {model_config}")
        self.model_name, self.pretrained, self.model_config = model, pretrained, model_config
        self.device_name, self.dtype_name = device, dtype
        self.model: Any = None
        self.embed_dim = 0

    @property
    def version(self) -> str:
        return f"{self.model_name}:{self.pretrained}" if self.pretrained else self.model_name

    def load(self) -> None:
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2

        self.device = resolve_device(self.device_name)
        self.dtype = resolve_dtype(self.dtype_name, self.device)
        if self.model_config is not None:
            if not Path(self.model_config).is_file():
                raise AnnotatorError(f"open_clip model_config {self.model_config} does not exist")
            open_clip.add_model_config(self.model_config)
        _check_pretrained(self.pretrained)
        try:
            model = open_clip.create_model(
                self.model_name,
                pretrained=self.pretrained,
                device=self.device,
                precision=_PRECISION[str(self.dtype).removeprefix("torch.")],
                require_pretrained=bool(self.pretrained),
            )
        except (RuntimeError, FileNotFoundError, ValueError) as exc:
            raise AnnotatorError(f"cannot create open_clip model {self.version}: {exc}") from exc
        self.model = model.eval()
        self.preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
        self.tokenizer = open_clip.get_tokenizer(self.model_name)
        self.embed_dim = int(self.encode_texts(["a"], 1).shape[1])  # towers differ in where they keep it
        logger.info("loaded open_clip %s on %s (%s)", self.version, self.device, self.dtype)

    def encode_images(self, images: Sequence[Image.Image], batch_size: int):
        """L2-normalised image embeddings, float32 tensor (N, D) on the model device."""
        import torch

        self._check_loaded()
        feats = []
        with torch.inference_mode():
            for batch in chunks(images, batch_size):
                pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in batch])
                feats.append(self.model.encode_image(pixels.to(self.device, self.dtype)).float())
        return _normalise(torch.cat(feats)) if feats else torch.zeros(0, self.embed_dim, device=self.device)

    def encode_texts(self, texts: Sequence[str], batch_size: int):
        """L2-normalised text embeddings, float32 tensor (T, D) on the model device."""
        import torch

        self._check_loaded()
        feats = []
        with torch.inference_mode():
            for batch in chunks(texts, batch_size):
                tokens = self.tokenizer(list(batch)).to(self.device)
                feats.append(self.model.encode_text(tokens).float())
        return _normalise(torch.cat(feats)) if feats else torch.zeros(0, self.embed_dim, device=self.device)

    def _check_loaded(self) -> None:
        if self.model is None:
            raise AnnotatorError("call load() before encoding")


def _normalise(feats):
    import torch.nn.functional as F

    return F.normalize(feats, dim=-1)


def _check_pretrained(pretrained: str | None) -> None:
    """A ``pretrained`` that looks like a file path must exist (otherwise it is an open_clip tag)."""
    if pretrained is None:
        return
    path = Path(pretrained).expanduser()
    looks_like_path = path.suffix in _CHECKPOINT_SUFFIXES or path.is_absolute() or pretrained.startswith((".", "~"))
    if looks_like_path and not path.is_file():
        raise AnnotatorError(f"open_clip checkpoint {pretrained} does not exist")


def write_tiny_open_clip(out_dir: str | Path) -> dict[str, str]:
    """Write a tiny random open_clip ViT (64 px, patch 16, width 64, 2 layers; bundled BPE text, width 64, 2 layers)
    as ``<out_dir>/umg-tiny-clip.json`` + ``umg-tiny-clip.safetensors``; return the encoder keys that load it."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / f"{TINY_MODEL_NAME}.json"
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    open_clip.add_model_config(config_path)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_MODEL_NAME, pretrained=None)
    checkpoint = out / f"{TINY_MODEL_NAME}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    return {"model": TINY_MODEL_NAME, "pretrained": str(checkpoint), "model_config": str(config_path)}


class OpenClipBackend(Backend):
    """Base of the open_clip backends: one ``OpenClipEncoder`` from the config keys ``model``, ``pretrained``,
    ``model_config``, ``device``, ``dtype``; images are encoded ``batch_size`` at a time.

    A subclass keeps its own keyword-only ``__init__`` (its config) and passes those keys on here.
    """

    def __init__(
        self, *, model: str, pretrained: str | None, model_config: str | None, device: str, dtype: str, batch_size: int
    ) -> None:
        self.encoder = OpenClipEncoder(
            model=model, pretrained=pretrained, model_config=model_config, device=device, dtype=dtype
        )
        self.batch_size = batch_size

    @classmethod
    def create_tiny(cls, out_dir: str | Path) -> dict[str, Any]:
        return {"backend": cls.name, **write_tiny_open_clip(out_dir)}

    @property
    def version(self) -> str:
        return self.encoder.version

    def load(self) -> None:
        self.encoder.load()


class OpenClipScorer(OpenClipBackend):
    """Cosine similarity of each image with each of its texts: ``(images, texts_per_image) -> [(T_i,) float32]``."""

    kind: ClassVar[str] = "scorer"
    name: ClassVar[str] = "open_clip"

    def __init__(
        self,
        *,
        model: str,
        pretrained: str | None = None,
        model_config: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 32,
        text_batch_size: int = 256,
    ) -> None:
        super().__init__(
            model=model, pretrained=pretrained, model_config=model_config, device=device, dtype=dtype,
            batch_size=batch_size,
        )
        self.text_batch_size = text_batch_size

    def __call__(self, images: Sequence[Image.Image], texts_per_image: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Images in chunks of ``batch_size``, all texts (flattened) in chunks of ``text_batch_size``.

        Returns one float32 array per image, shape (T_i,), values = cosine similarity in [-1, 1].
        """
        check_batch(images, texts_per_image)
        flat = [text for texts in texts_per_image for text in texts]
        image_feats = self.encoder.encode_images(images, self.batch_size)  # (N, D)
        text_feats = self.encoder.encode_texts(flat, self.text_batch_size)  # (sum T_i, D)
        scores, start = [], 0
        for i, texts in enumerate(texts_per_image):
            stop = start + len(texts)
            sims = text_feats[start:stop] @ image_feats[i]
            scores.append(sims.cpu().numpy().astype(np.float32))
            start = stop
        return scores
