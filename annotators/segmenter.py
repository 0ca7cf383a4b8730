"""Box-prompted foreground masks (stage 5, paper §3): ``segmenter(images, boxes[, jittered]) -> list[SegmentOutput]``.

Backend ``sam`` (:class:`SamSegmenter`): ``segment_anything.SamPredictor``. The images of a call go through the
expensive image encoder together, ``encoder_batch`` at a time (what ``set_image`` does, batched); then each image's
boxes go through the light mask decoder, ``box_chunk`` prompts per call
(full-resolution masks are upsampled per chunk, which bounds memory on large images). Given each box's jittered
copies, the same call decodes those too and returns every mask's jitter stability, computed at the model's input
resolution (longest side 1024, not the original 12 MP): the image is encoded once for masks and stability, and no
jitter mask is upsampled to full size or leaves the actor.
A small LRU cache keyed by the image's pixels (a digest, not the object: Ray workers receive copies) serves
later calls on the same image. ``segment_boxes(image, boxes)`` is the single-image form that
``pipeline.filters.mask_stability`` (the full-resolution reference) takes as its ``segment`` callable.

Model types: ``SAM_BUILDERS`` holds segment_anything's ``vit_h`` / ``vit_l`` / ``vit_b`` (same names as
``segment_anything.sam_model_registry``) plus ``vit_tiny``, a small model for tests and smoke runs built by
:func:`build_sam_sized`, which mirrors ``segment_anything.build_sam._build_sam`` with every size a parameter.
Checkpoints load with ``torch.load(weights_only=True)`` (or safetensors), never by unpickling code:
segment_anything's own builders call ``torch.load`` without ``weights_only``, so they are used with
``checkpoint=None`` and the state dict is loaded here.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from annotators._devices import existing_path, resolve_device, resolve_dtype, rgb, seeded
from annotators.base import AnnotatorError, Backend, SegmentOutput, check_batch

log = logging.getLogger(__name__)


def build_sam_sized(
    *,
    encoder_embed_dim: int,
    encoder_depth: int,
    encoder_num_heads: int,
    encoder_global_attn_indexes: Sequence[int],
    image_size: int = 1024,
    patch_size: int = 16,
    window_size: int = 14,
    prompt_embed_dim: int = 256,
    mask_in_chans: int = 16,
    decoder_depth: int = 2,
    decoder_mlp_dim: int = 2048,
    decoder_num_heads: int = 8,
    iou_head_depth: int = 3,
    iou_head_hidden_dim: int = 256,
) -> Any:
    """A random-initialised ``segment_anything.modeling.Sam`` in eval mode; defaults are SAM's own sizes.

    The image embedding is ``(prompt_embed_dim, image_size / patch_size, image_size / patch_size)``; low-res
    masks are 4x that grid. ``prompt_embed_dim`` must be divisible by 8 (mask decoder upscaling).
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    embedding_size = image_size // patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=encoder_depth,
            embed_dim=encoder_embed_dim,
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=encoder_num_heads,
            patch_size=patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(encoder_global_attn_indexes),
            window_size=window_size,
            out_chans=prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=decoder_depth, embedding_dim=prompt_embed_dim, mlp_dim=decoder_mlp_dim,
                num_heads=decoder_num_heads,
            ),
            transformer_dim=prompt_embed_dim,
            iou_head_depth=iou_head_depth,
            iou_head_hidden_dim=iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def _segment_anything_builder(model_type: str) -> Callable[[], Any]:
    def build() -> Any:
        from segment_anything import sam_model_registry

        return sam_model_registry[model_type](checkpoint=None)

    return build


SAM_BUILDERS: dict[str, Callable[[], Any]] = {
    "vit_h": _segment_anything_builder("vit_h"),
    "vit_l": _segment_anything_builder("vit_l"),
    "vit_b": _segment_anything_builder("vit_b"),
    # ~0.1 M parameters, 64 px input: tests, smoke config and the CPU benchmark only.
    "vit_tiny": partial(
        build_sam_sized, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(1,),
        image_size=64, patch_size=8, window_size=4, prompt_embed_dim=32, mask_in_chans=4, decoder_depth=1,
        decoder_mlp_dim=64, decoder_num_heads=2, iou_head_depth=2, iou_head_hidden_dim=32,
    ),
}


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors only: ``.safetensors`` via safetensors, anything else via ``torch.load(weights_only=True)``."""
    path = existing_path(path, "SAM checkpoint")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have no common base class
        raise AnnotatorError(f"cannot read SAM checkpoint {path}: {exc}") from exc


def _pixel_key(pixels: np.ndarray) -> tuple:
    """Cache key of an image: its shape and a digest of its pixels (Ray workers receive copies, not the object)."""
    return pixels.shape, hashlib.blake2b(pixels.data, digest_size=16).digest()


def overlap_counts(masks_a: torch.Tensor, masks_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise intersection and union pixel counts of ``(M, h, w)`` bool masks: two ``(M,)`` float64 tensors."""
    a, b = masks_a.flatten(1), masks_b.flatten(1)
    return (a & b).sum(dim=1, dtype=torch.float64), (a | b).sum(dim=1, dtype=torch.float64)


class SamSegmenter(Backend):
    """SAM prompted with region boxes, one mask per box.

    Args:
        model_type: a key of ``SAM_BUILDERS`` (``vit_h``, ``vit_l``, ``vit_b``, ``vit_tiny``).
        checkpoint: state-dict file matching ``model_type`` (e.g. ``sam_vit_h_4b8939.pth``).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:<k>"``.
        dtype: ``"float32"``, ``"float16"`` (CUDA only), ``"bfloat16"``: the compute dtype, through ``torch.autocast``.
            The weights stay float32: segment_anything's prompt encoder casts box coordinates to float32 before
            its positional-encoding matmul, so a model cast to half precision fails there.
        multimask: ask SAM for 3 masks per box and keep the one with the highest predicted IoU (default: one mask).
        embedding_cache: how many image embeddings to keep for later calls on the same image (vit_h: 4 MB each at
            float32); 0 disables the cache. A call never needs it: masks and jitter stability share one encoding.
        box_chunk: boxes per mask-decoder call and per full-resolution upsample: peak memory is about
            ``box_chunk * H * W * 4`` bytes (16 boxes of a 12 MP image: 0.8 GB) instead of all boxes at once.
        encoder_batch: images per image-encoder pass (each resized to a longest side of 1024 and padded, as
            ``set_image`` does); 1 encodes one image at a time.
    """

    kind: ClassVar[str] = "segmenter"
    name: ClassVar[str] = "sam"

    def __init__(
        self,
        *,
        model_type: str,
        checkpoint: str,
        device: str = "auto",
        dtype: str = "float32",
        multimask: bool = False,
        embedding_cache: int = 16,
        box_chunk: int = 16,
        encoder_batch: int = 4,
    ) -> None:
        if model_type not in SAM_BUILDERS:
            raise AnnotatorError(f"unknown SAM model_type {model_type!r}; known: {', '.join(sorted(SAM_BUILDERS))}")
        self.model_type, self.checkpoint = model_type, str(checkpoint)
        self.device_spec, self.dtype_spec, self.multimask = device, dtype, bool(multimask)
        self.embedding_cache = max(int(embedding_cache), 0)
        if int(box_chunk) < 1:
            raise AnnotatorError(f"sam: box_chunk must be >= 1, got {box_chunk}")
        self.box_chunk = int(box_chunk)
        if int(encoder_batch) < 1:
            raise AnnotatorError(f"sam: encoder_batch must be >= 1, got {encoder_batch}")
        self.encoder_batch = int(encoder_batch)
        self._lock = threading.Lock()  # the predictor holds one image at a time: one call at a time
        self.predictor: Any = None
        self._dtype = torch.float32
        # pixel digest -> (features (1, C, h, w), original_size, input_size)
        self._embeddings: OrderedDict[tuple, tuple[torch.Tensor, tuple, tuple]] = OrderedDict()
        self._current: tuple[tuple, torch.Tensor] | None = None  # (digest, features) the predictor holds

    @property
    def version(self) -> str:
        return f"{self.model_type}:{Path(self.checkpoint).name}"

    def load(self) -> None:
        """Build the model type, load the checkpoint (weights only), move to device/dtype, wrap in ``SamPredictor``."""
        if self.predictor is not None:
            return
        from segment_anything import SamPredictor

        device = resolve_device(self.device_spec)
        dtype = resolve_dtype(self.dtype_spec, device)
        state_dict = load_state_dict(self.checkpoint)
        sam = SAM_BUILDERS[self.model_type]()
        try:
            sam.load_state_dict(state_dict)
        except RuntimeError as exc:
            raise AnnotatorError(
                f"SAM checkpoint {self.checkpoint} does not match model_type {self.model_type!r}: {exc}"
            ) from exc
        self.predictor = SamPredictor(sam.to(device=device).eval())
        self._dtype = dtype
        log.info("loaded SAM %s on %s %s", self.version, device, dtype)

    def __call__(
        self,
        images: Sequence[Image.Image],
        boxes: Sequence[np.ndarray],
        jittered: Sequence[np.ndarray] | None = None,
    ) -> list[SegmentOutput]:
        """Masks for every box of every image, and with ``jittered`` each mask's stability under box jitter.

        Each image is encoded once; its boxes are decoded ``box_chunk`` at a time (full-resolution masks are
        upsampled per chunk, bounding memory). Stability is the mean IoU of a box's mask with the masks of its
        jittered copies, both at the model's input resolution (longest side 1024 for SAM), computed here
        so no jitter mask is upsampled to full size or returned.

        Args:
            images: ``B`` PIL images.
            boxes: ``B`` arrays ``(N_i, 4)`` xyxy pixels of the matching image.
            jittered: ``B`` arrays ``(N_i, K, 4)``: each box's ``K`` jittered copies
                (``pipeline.filters.jitter_boxes``).

        Returns:
            ``B`` :class:`SegmentOutput`: ``masks (N_i, H_i, W_i)`` bool at the image's size, ``scores (N_i,)``
            float32 SAM IoU predictions, ``stability (N_i,)`` float64 when ``jittered`` is given.
        """
        check_batch(images, boxes, *([jittered] if jittered is not None else []))
        with self._lock:
            encoded = self._encode([image for image, b in zip(images, boxes, strict=True) if len(b)])
            return [
                self._segment(image, image_boxes, None if jittered is None else jittered[i], encoded)
                for i, (image, image_boxes) in enumerate(zip(images, boxes, strict=True))
            ]

    def segment_boxes(self, image: Image.Image, boxes_xyxy: np.ndarray) -> np.ndarray:
        """``pipeline.filters.SegmentFn``: ``(M, 4)`` boxes of one image -> ``(M, H, W)`` bool masks."""
        with self._lock:
            return self._segment(image, boxes_xyxy, None).masks

    def _encode(self, images: Sequence[Image.Image]) -> dict[tuple, tuple[torch.Tensor, tuple, tuple]]:
        """Image embeddings of ``images``: pixel digest -> (features ``(1, C, h, w)``, original size, input size), as
        ``SamPredictor.set_image`` would set them; from the cache, or encoded ``encoder_batch`` per encoder pass."""
        if self.predictor is None:
            raise AnnotatorError("segmenter is not loaded: call load() first")
        predictor, model = self.predictor, self.predictor.model
        pending: dict[tuple, np.ndarray] = {}
        encoded: dict[tuple, tuple[torch.Tensor, tuple, tuple]] = {}
        for image in images:
            pixels = np.ascontiguousarray(np.asarray(rgb(image)))
            key = _pixel_key(pixels)
            if key in self._embeddings:  # held for this call even if the LRU drops it meanwhile
                encoded[key] = self._embeddings[key]
            elif key not in pending:
                pending[key] = pixels
        keys = list(pending)
        for start in range(0, len(keys), self.encoder_batch):
            chunk = keys[start : start + self.encoder_batch]
            resized = [predictor.transform.apply_image(pending[key]) for key in chunk]  # longest side 1024
            batch = torch.cat([model.preprocess(torch.as_tensor(r, device=predictor.device).permute(2, 0, 1)[None])
                               for r in resized])  # normalised, padded to 1024 x 1024: (B, 3, 1024, 1024)
            with torch.inference_mode(), self._autocast():
                features = model.image_encoder(batch)
            for i, (key, small) in enumerate(zip(chunk, resized, strict=True)):
                encoded[key] = (features[i : i + 1], pending[key].shape[:2], small.shape[:2])
        return encoded

    def _segment(self, image: Image.Image, boxes_xyxy: np.ndarray, jittered: np.ndarray | None,
                 encoded: dict[tuple, tuple[torch.Tensor, tuple, tuple]] | None = None) -> SegmentOutput:
        if self.predictor is None:
            raise AnnotatorError("segmenter is not loaded: call load() first")
        boxes = np.asarray(boxes_xyxy, dtype=np.float32)
        if boxes.size == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must be (N, 4) xyxy, got shape {boxes.shape}")
        n = len(boxes)
        if jittered is not None:
            jittered = np.asarray(jittered, dtype=np.float32)
            if jittered.ndim != 3 or jittered.shape[0] != n or jittered.shape[2] != 4 or jittered.shape[1] == 0:
                raise ValueError(f"jittered boxes must be (N={n}, K>0, 4), got shape {jittered.shape}")
        masks = np.zeros((n, image.height, image.width), dtype=bool)
        scores = np.zeros(n, dtype=np.float32)
        if n == 0:
            return SegmentOutput(masks, scores, None if jittered is None else np.zeros(0, dtype=np.float64))
        model, at_input = self.predictor.model, []
        with torch.inference_mode(), self._autocast():
            self._set_image(image, encoded or {})
            for start in range(0, n, self.box_chunk):
                logits, iou = self._decode(boxes[start : start + self.box_chunk])
                full = model.postprocess_masks(logits, self.predictor.input_size, self.predictor.original_size)
                masks[start : start + len(logits)] = (full[:, 0] > model.mask_threshold).cpu().numpy()
                scores[start : start + len(logits)] = iou.float().cpu().numpy()
                if jittered is not None:
                    at_input.append(self._input_res_masks(logits))
            if jittered is None:
                return SegmentOutput(masks, scores)
            stability = self._jitter_stability(torch.cat(at_input), jittered)
        return SegmentOutput(masks, scores, stability)

    def _jitter_stability(self, masks: torch.Tensor, jittered: np.ndarray) -> np.ndarray:
        """Mean IoU of ``masks`` ``(N, h, w)`` (input resolution) with the masks of ``jittered`` ``(N, K, 4)``,
        decoded ``box_chunk`` boxes at a time; only counts are kept, never the jitter masks."""
        n, k = jittered.shape[:2]
        flat = jittered.reshape(-1, 4)
        inter = torch.zeros(n * k, dtype=torch.float64, device=masks.device)
        union = torch.zeros_like(inter)
        for start in range(0, len(flat), self.box_chunk):
            moved = self._input_res_masks(self._decode(flat[start : start + self.box_chunk])[0])
            rows = torch.arange(start, start + len(moved), device=masks.device)
            inter[rows], union[rows] = overlap_counts(masks[rows // k], moved)
        ious = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))
        return ious.reshape(n, k).mean(dim=1).cpu().numpy()

    def _decode(self, boxes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's prompt encoder + mask decoder for ``(M, 4)`` boxes of the image the predictor holds (what
        ``SamPredictor.predict_torch`` does, without upsampling): low-res logits ``(M, 1, h, w)`` float32 of
        the best mask per box and its predicted IoU ``(M,)``."""
        predictor, model = self.predictor, self.predictor.model
        boxes_torch = torch.as_tensor(boxes, device=predictor.device)
        transformed = predictor.transform.apply_boxes_torch(boxes_torch, predictor.original_size)
        sparse, dense = model.prompt_encoder(points=None, boxes=transformed, masks=None)
        logits, iou = model.mask_decoder(
            image_embeddings=predictor.features, image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=self.multimask,
        )
        # logits (M, C, h, w), iou (M, C); C = 3 with multimask, else 1: keep the best-rated mask per box
        best = iou.argmax(dim=1)
        rows = torch.arange(len(best), device=best.device)
        return logits[rows, best][:, None].float(), iou[rows, best]

    def _input_res_masks(self, logits: torch.Tensor) -> torch.Tensor:
        """``(M, 1, h, w)`` low-res logits -> ``(M, H_in, W_in)`` bool masks at the model's input resolution (the
        image resized to a longest side of 1024 for SAM, padding removed): the first half of SAM's own
        ``postprocess_masks``, without the upsample to the original size (12 MP images: ~12x fewer pixels)."""
        model = self.predictor.model
        size = model.image_encoder.img_size
        rows, cols = self.predictor.input_size
        upsampled = torch.nn.functional.interpolate(logits, (size, size), mode="bilinear", align_corners=False)
        return upsampled[:, 0, :rows, :cols] > model.mask_threshold

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self._dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.predictor.device.type, dtype=self._dtype)

    def _set_image(self, image: Image.Image, encoded: dict[tuple, tuple[torch.Tensor, tuple, tuple]]) -> None:
        """Make the predictor hold ``image``'s embedding: from this call's batched ``encoded``, the cache, or by
        running the image encoder."""
        pixels = np.ascontiguousarray(np.asarray(rgb(image)))
        key = _pixel_key(pixels)
        predictor = self.predictor
        if self._current is not None and self._current[0] == key and predictor.features is self._current[1]:
            return
        cached = encoded.get(key)
        if cached is not None and self.embedding_cache:
            self._remember(key, cached)
        elif cached is None and key in self._embeddings:  # segment_boxes: one image, no batched encoding
            self._embeddings.move_to_end(key)
            cached = self._embeddings[key]
        if cached is not None:
            predictor.features, predictor.original_size, predictor.input_size = cached
            predictor.is_image_set = True
        else:
            predictor.set_image(pixels, image_format="RGB")
            if self.embedding_cache:
                self._remember(key, (predictor.features, predictor.original_size, predictor.input_size))
        self._current = (key, predictor.features)

    def _remember(self, key: tuple, embedding: tuple[torch.Tensor, tuple, tuple]) -> None:
        self._embeddings[key] = embedding
        self._embeddings.move_to_end(key)
        while len(self._embeddings) > self.embedding_cache:
            self._embeddings.popitem(last=False)

    @classmethod
    def create_tiny(cls, out_dir: str | Path) -> dict[str, Any]:
        """Save a random ``vit_tiny`` SAM state dict to ``out_dir/sam_vit_tiny.pth``; returns its CPU config."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with seeded():
            sam = SAM_BUILDERS["vit_tiny"]()
        checkpoint = out_dir / "sam_vit_tiny.pth"
        torch.save(sam.state_dict(), checkpoint)
        return {"backend": cls.name, "model_type": "vit_tiny", "checkpoint": str(checkpoint), "device": "cpu"}
