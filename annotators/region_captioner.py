"""Region captioners (DESIGN.md "Annotation stages" 4): ``(images, boxes_per_image) -> [image][box][RegionCaption]``.

Boxes are float arrays (N_i, 4) xyxy in pixels of their image; N_i may be 0. Captions per box are stripped,
deduplicated and non-empty (a box may get an empty list when the model produced only whitespace).

- ``VlmBoxCaptioner`` (``vlm-box``): Shikra-style box-in-prompt. The box is written into the prompt as
  normalised ``[x1,y1,x2,y2]`` with 3 decimals (Shikra's format, e.g. ``[0.102,0.250,0.480,0.911]``); same model
  loading as the ``vlm`` captioner; all boxes of the batch are flattened and generated in chunks of ``batch_size``.
- ``CropCaptioner`` (``crop``): the portable backend; crops each box (padded by ``pad`` x box size per side, grown
  to at least ``min_size`` px) and captions all crops of the batch with a wrapped captioner backend.
- ``Gpt4RoiCaptioner`` (``gpt4roi``): the paper's GPT4RoI, run through its own (non-PyPI) code: one prompt per box
  ("... region1 <bbox> ..."), the box as RoI features from its coordinates relative to the image; boxes of a call
  batched ``batch_size`` per ``generate``. Needs GPT4RoI's pinned LLaVA/transformers stack; see its docstring.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from annotators._hf import (
    VlmBackend,
    check_model_path,
    chunks,
    clean_texts,
    from_pretrained,
    resolve_device,
    resolve_dtype,
)
from annotators.base import AnnotatorError, Backend, check_batch, config_kwargs, require
from data_schemas import RegionCaption

logger = logging.getLogger(__name__)

GPT4ROI_EXTRA = (
    "GPT4RoI is not on PyPI and its LLaVA fork pins an old transformers; use the GPT4RoI venv of the CUDA worker "
    "image (docker/Dockerfile.cuda: /opt/gpt4roi-venv, a checkout of github.com/jshilong/GPT4RoI with mmcv and mmdet)"
)


def as_boxes(boxes: Any) -> np.ndarray:
    """``boxes`` as float32 (N, 4); ``ValueError`` naming the shape otherwise."""
    array = np.asarray(boxes, dtype=np.float32)
    if array.size == 0:
        return array.reshape(0, 4)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4) xyxy, got {array.shape}")
    return array


def shikra_box(box_xyxy: Sequence[float], width: int, height: int) -> str:
    """Pixel box -> Shikra's normalised ``[x1,y1,x2,y2]`` string (3 decimals, clipped to [0, 1])."""
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    coords = [x1 / width, y1 / height, x2 / width, y2 / height]
    return "[" + ",".join(f"{min(max(c, 0.0), 1.0):.3f}" for c in coords) + "]"


def crop_box(image: Image.Image, box_xyxy: Sequence[float], pad: float, min_size: int) -> Image.Image:
    """The box grown by ``pad`` x its width/height per side, then to ``min_size`` px around its centre, clipped to
    the image (at least 1 px), and cropped."""
    width, height = image.size
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    pad_x, pad_y = pad * (x2 - x1), pad * (y2 - y1)
    x1, x2 = _grow(x1 - pad_x, x2 + pad_x, min_size, width)
    y1, y2 = _grow(y1 - pad_y, y2 + pad_y, min_size, height)
    return image.crop((x1, y1, x2, y2))


def _grow(lo: float, hi: float, min_size: int, limit: int) -> tuple[int, int]:
    if hi - lo < min_size:
        centre = (lo + hi) / 2
        lo, hi = centre - min_size / 2, centre + min_size / 2
    lo_px = min(max(math.floor(lo), 0), limit - 1)
    hi_px = max(min(math.ceil(hi), limit), lo_px + 1)
    return lo_px, hi_px


def _flatten(images: Sequence[Image.Image], boxes_per_image: Sequence[Any]) -> tuple[list[np.ndarray], list[tuple]]:
    """Validated boxes per image and the flat list of ``(image_index, box)`` jobs."""
    check_batch(images, boxes_per_image)
    boxes = [as_boxes(b) for b in boxes_per_image]
    return boxes, [(i, box) for i, image_boxes in enumerate(boxes) for box in image_boxes]


def _regroup(boxes: list[np.ndarray], flat: list[list[RegionCaption]]) -> list[list[list[RegionCaption]]]:
    out, start = [], 0
    for image_boxes in boxes:
        out.append(flat[start : start + len(image_boxes)])
        start += len(image_boxes)
    return out


class VlmBoxCaptioner(VlmBackend):
    """Shikra-style region captions: one prompt per box with its normalised coordinates (module docstring)."""

    kind: ClassVar[str] = "region_captioner"
    name: ClassVar[str] = "vlm-box"

    def __init__(
        self,
        *,
        model: str,
        prompt: str = "What is in the region {box}? Answer briefly.",
        max_new_tokens: int = 20,
        num_beams: int = 1,
        num_return_sequences: int = 1,
        generate_kwargs: Mapping[str, Any] | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 16,
    ) -> None:
        if "{box}" not in prompt:
            raise AnnotatorError(f"vlm-box prompt {prompt!r} needs a '{{box}}' placeholder")
        super().__init__(
            model=model, prompt=prompt, max_new_tokens=max_new_tokens, num_beams=num_beams,
            num_return_sequences=num_return_sequences, generate_kwargs=generate_kwargs, device=device, dtype=dtype,
            batch_size=batch_size,
        )

    def __call__(
        self, images: Sequence[Image.Image], boxes_per_image: Sequence[Any]
    ) -> list[list[list[RegionCaption]]]:
        boxes, jobs = _flatten(images, boxes_per_image)
        rgb = [im.convert("RGB") for im in images]
        flat: list[list[RegionCaption]] = []
        for batch in chunks(jobs, self.batch_size):
            prompts = [self.prompt.format(box=shikra_box(box, *rgb[i].size)) for i, box in batch]
            texts = self.generator.generate([rgb[i] for i, _ in batch], prompts)
            flat += [[RegionCaption(text=t, annotator=self.name) for t in clean_texts(ts)] for ts in texts]
        return _regroup(boxes, flat)


class CropCaptioner(Backend):
    """Caption padded box crops with any ``captioner`` backend (one call over all crops of the batch)."""

    kind: ClassVar[str] = "region_captioner"
    name: ClassVar[str] = "crop"

    def __init__(self, *, captioner: Any, pad: float = 0.1, min_size: int = 16) -> None:
        if pad < 0 or min_size < 1:
            raise AnnotatorError(f"crop: pad must be >= 0 and min_size >= 1, got pad={pad}, min_size={min_size}")
        self.captioner, self.pad, self.min_size = captioner, pad, min_size

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> CropCaptioner:
        from annotators.registry import build

        kwargs = config_kwargs(cls, cfg)
        if not isinstance(kwargs["captioner"], Mapping):
            raise AnnotatorError("crop: 'captioner' must be a captioner config mapping, e.g. {backend: blip2, ...}")
        kwargs["captioner"] = build("captioner", kwargs["captioner"])
        return cls(**kwargs)

    @classmethod
    def create_tiny(cls, out_dir: str | Path) -> dict[str, Any]:
        from annotators.captioner import Blip2Captioner

        return {"backend": cls.name, "captioner": Blip2Captioner.create_tiny(out_dir), "pad": 0.1, "min_size": 16}

    @property
    def annotator(self) -> str:
        return f"{self.name}+{self.captioner.name}"

    @property
    def version(self) -> str:
        return f"{self.captioner.name}@{self.captioner.version}"

    def load(self) -> None:
        self.captioner.load()

    def __call__(
        self, images: Sequence[Image.Image], boxes_per_image: Sequence[Any]
    ) -> list[list[list[RegionCaption]]]:
        boxes, jobs = _flatten(images, boxes_per_image)
        rgb = [im.convert("RGB") for im in images]
        crops = [crop_box(rgb[i], box, self.pad, self.min_size) for i, box in jobs]
        captions = self.captioner(crops) if crops else []
        flat = [[RegionCaption(text=c.text, annotator=self.annotator) for c in caps] for caps in captions]
        return _regroup(boxes, flat)


# --- GPT4RoI ---------------------------------------------------------------------------------------------------
# Upstream: https://github.com/jshilong/GPT4RoI, read at these commits: gpt4roi/app.py 2a361395, gpt4roi/cli_demo.py
# and gpt4roi/models/{spi_llava,layers}.py f6306fa2, gpt4roi/train/train.py 43770e69, gpt4roi/datasets/vg.py f6306fa2.

# gpt4roi/app.py: the special tokens it adds to the tokenizer (ConversationBot.build_model) ...
GPT4ROI_IMAGE_PATCH_TOKEN = "<im_patch>"
GPT4ROI_IM_START_TOKEN, GPT4ROI_IM_END_TOKEN = "<im_start>", "<im_end>"
GPT4ROI_SPI_TOKENS = ["<bbox>", "<point>"]
# ... its multimodal_cfg for train.preprocess_multimodal (<image> -> <im_start> + 256 x <im_patch> + <im_end>) ...
GPT4ROI_MULTIMODAL_CFG = {
    "is_multimodal": True,
    "sep_image_conv_front": False,
    "image_token_len": 256,
    "image_aspect_ratio": "square",
    "use_im_start_end": True,
}
# ... the image side (224 x 224 after F.interpolate; "14 is hardcoded patch size") ...
GPT4ROI_IMAGE_SIZE, GPT4ROI_PATCH_SIZE = 224, 14
# ... the first-turn preamble (ConversationBot.init_inputs; also VGDATA / RefCOCOG.begin_str in gpt4roi/datasets) ...
GPT4ROI_BEGIN = "The <image> provides an overview of the picture.\n"
# ... what init_inputs turns the user's "<region1>" into (re.sub(r'<region(\d+)>', r'region\g<1> <bbox>', ...)) ...
GPT4ROI_REGION = "region1 <bbox>"
# ... and the stop string of its KeywordsStoppingCriteria (the v0 "###" separator of LLaVA's conversation template).
GPT4ROI_STOP = "###"
# A region-caption question from the training set: FINAL_QUESTIONS in gpt4roi/datasets/vg.py (= REFG_QUESTIONS in
# refcoco.py), whose answers are Visual Genome region descriptions / RefCOCOg expressions, i.e. short captions.
GPT4ROI_DEFAULT_PROMPT = "What can you tell me about the region indicated by {region} in the image?"


def gpt4roi_question(prompt: str) -> str:
    """The one human turn of a GPT4RoI region prompt: app.py's preamble + ``prompt`` with ``{region}`` replaced by
    ``region1 <bbox>`` (one region per prompt, so it is always region1)."""
    return GPT4ROI_BEGIN + prompt.replace("{region}", GPT4ROI_REGION)


def gpt4roi_boxes(boxes_xyxy: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pixel xyxy -> GPT4RoI's box input: relative to the image size (app.py ``init_inputs``:
    ``ori_bboxes / [w, h, w, h]``), clipped to [0, 1] (app.py's drawn boxes always lie inside the image).

    The image is stretched to 224 x 224 without keeping its aspect ratio, so relative coordinates are the same on
    the resized image; ``MlvlRoIExtractor.forward`` (gpt4roi/models/layers.py) multiplies them by 224 for RoIAlign
    and feeds them unscaled to its ``pos_embedd``.
    """
    scale = np.array([width, height, width, height], dtype=np.float64)
    return np.clip(np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4) / scale, 0.0, 1.0).astype(np.float32)


def gpt4roi_answer(text: str) -> str:
    """A decoded continuation -> the answer, as app.py ``run`` cleans it: up to the ``###`` stop string, stripped,
    without the ``Assistant:`` role prefix (the prompt ends with ``"### "``, so the model writes the role first)."""
    text = text.split(GPT4ROI_STOP, 1)[0].strip()
    return text.replace("Assistant: ", "").replace("Assistant:", "").strip()


class StopWhenAllAnswered:
    """``generate`` stopping criterion: stop once *every* row has written ``stop`` or ``eos_id`` after ``start``.

    app.py stops on ``llava.model.utils.KeywordsStoppingCriteria(["###"], ...)``, which in LLaVA v0 decodes only
    row 0 (it serves batch-1 demos), so in a batch it would stop every row when the first one is done; this checks
    each row (rows that finish early go on generating until the rest are done; ``gpt4roi_answer`` cuts them at their
    first ``###``).
    """

    def __init__(self, tokenizer: Any, start: int, stop: str = GPT4ROI_STOP, eos_id: int | None = None) -> None:
        self.tokenizer, self.start, self.stop, self.eos_id = tokenizer, start, stop, eos_id

    def __call__(self, output_ids: Any, scores: Any, **kwargs: Any) -> bool:
        for row in output_ids[:, self.start :]:
            if self.eos_id is not None and bool((row == self.eos_id).any()):
                continue
            if self.stop not in self.tokenizer.decode(row, skip_special_tokens=True):
                return False
        return True


class Gpt4RoiCaptioner(Backend):
    """GPT4RoI (``SPILlavaMPTForCausalLM``, a LLaVA-v0 LLaMA-7B with RoI features at ``<bbox>`` tokens) region captions.

    Runs GPT4RoI's own code (the ``gpt4roi`` and ``llava`` packages of github.com/jshilong/GPT4RoI, with mmcv and
    mmdet), imported in ``load()``; ``MissingDependencyError`` names docker/Dockerfile.cuda when it is missing.
    That code needs the transformers its LLaVA fork pins (git cae78c46, 4.28.dev): on transformers >= 4.36 its
    ``AutoConfig.register("llava", ...)`` fails at import, and ``load()`` says so (``AnnotatorError``).

    Each box is asked about in its own prompt (``prompt`` with ``{region}`` -> ``region1 <bbox>``), built as
    gpt4roi/app.py ``ConversationBot.init_inputs`` builds its first turn and tokenised by upstream's
    ``gpt4roi.train.train.preprocess_multimodal`` / ``preprocess``. Boxes are batched: all boxes of the call are
    flattened and generated ``batch_size`` at a time in one ``generate`` (one sequence per box, with its image
    and its one box), which ``SPILlavaLlamaModel.forward`` supports (one image and one box list per row; its
    RoI extractor keeps the rows apart by index). As every prompt is token-identical (the box enters only as RoI
    features) the rows need no padding. Each image's pixels are computed once and shared by its boxes; the
    vision tower still runs once per row, as upstream's forward does.

    Differences from the demo, on purpose: greedy decoding (app.py samples at temperature 0.2) and
    ``max_new_tokens`` (app.py: 1024) for reproducible, short captions; ``dtype`` may be bfloat16 (app.py:
    float16; training ran in bf16); ``llava.utils.disable_torch_init`` is not called (it patches
    ``torch.nn.Linear``/``LayerNorm.reset_parameters`` process-wide; ``low_cpu_mem_usage`` already skips init).
    """

    kind: ClassVar[str] = "region_captioner"
    name: ClassVar[str] = "gpt4roi"

    def __init__(
        self,
        *,
        model: str,
        prompt: str = GPT4ROI_DEFAULT_PROMPT,
        max_new_tokens: int = 64,
        device: str = "auto",
        dtype: str = "float16",
        batch_size: int = 8,
    ) -> None:
        if prompt.count("{region}") != 1:
            raise AnnotatorError(f"gpt4roi prompt {prompt!r} needs exactly one '{{region}}' placeholder")
        reserved = [t for t in ("<image>", "<bbox>", "<point>", "<region") if t in prompt]
        if reserved:
            raise AnnotatorError(
                f"gpt4roi prompt {prompt!r} must not contain {reserved}: the box goes in through '{{region}}'"
            )
        if int(max_new_tokens) < 1 or int(batch_size) < 1:
            raise AnnotatorError(
                f"gpt4roi max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}"
            )
        self.model_path, self.prompt = str(model), prompt
        self.max_new_tokens, self.batch_size = int(max_new_tokens), int(batch_size)
        self.device_name, self.dtype_name = device, dtype
        self._model: Any = None
        self._tokenizer: Any = None
        self._image_processor: Any = None
        self._prompt_ids: Any = None  # (1, L) int64: the token-identical prompt of every box
        self._device: Any = None
        self._dtype: Any = None

    @classmethod
    def create_tiny(cls, out_dir: str | Path) -> dict[str, Any]:
        require("gpt4roi", GPT4ROI_EXTRA)
        raise AnnotatorError(
            "gpt4roi has no tiny model: SPILlavaLlamaModel hard-codes its RoI module sizes (1024 -> 4096, 16 x 16 "
            "patches) and builds its CLIP ViT-L/14 tower from the hub; test it in the GPT4RoI venv with real weights"
        )

    @property
    def version(self) -> str:
        return self.model_path

    def load(self) -> None:
        """Load model, tokenizer and image processor as gpt4roi/app.py ``ConversationBot.build_model`` does (same
        steps as gpt4roi/cli_demo.py ``eval_model``), then tokenise the prompt once."""
        if self._model is not None:
            return
        require("gpt4roi", GPT4ROI_EXTRA)
        try:
            spi_llava = require("gpt4roi.models.spi_llava", GPT4ROI_EXTRA)
            upstream_train = require("gpt4roi.train.train", GPT4ROI_EXTRA)
        except ValueError as exc:  # llava/model/llava.py: AutoConfig.register("llava", ...) on a newer transformers
            import transformers

            raise AnnotatorError(
                f"GPT4RoI's LLaVA fork cannot be imported with transformers {transformers.__version__} ({exc}); it "
                "needs the transformers it pins (git cae78c46): run this backend in the GPT4RoI venv of "
                "docker/Dockerfile.cuda (/opt/gpt4roi-venv)"
            ) from exc
        import torch
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel

        path = check_model_path(self.model_path)
        device = resolve_device(self.device_name)
        dtype = resolve_dtype(self.dtype_name, device)

        # app.py build_model: AutoTokenizer + SPILlavaMPTForCausalLM.from_pretrained(low_cpu_mem_usage, fp16, cache).
        tokenizer = from_pretrained(AutoTokenizer, path)
        model = from_pretrained(
            spi_llava.SPILlavaMPTForCausalLM, path, low_cpu_mem_usage=True, torch_dtype=dtype, use_cache=True
        )
        # SPILlavaLlamaModel.forward writes the RoI features into the <bbox> slots only on its use_im_start_end
        # path; app.py hard-codes use_im_start_end=True in multimodal_cfg. A checkpoint without it cannot see boxes.
        if not getattr(model.config, "mm_use_im_start_end", False):
            raise AnnotatorError(f"{path}: config has no mm_use_im_start_end=true; not a GPT4RoI checkpoint")
        model = model.to(device).eval()
        # app.py: CLIPImageProcessor of the vision tower named in the config (openai/clip-vit-large-patch14).
        image_processor = from_pretrained(CLIPImageProcessor, model.config.mm_vision_tower)

        # app.py: add <im_patch>, <im_start>/<im_end> and the spatial tokens <bbox>/<point> (no-ops when the saved
        # tokenizer has them, as a GPT4RoI checkpoint's does; new ids would lie past the embedding table).
        tokenizer.add_tokens([GPT4ROI_IMAGE_PATCH_TOKEN], special_tokens=True)
        tokenizer.add_tokens([GPT4ROI_IM_START_TOKEN, GPT4ROI_IM_END_TOKEN], special_tokens=True)
        tokenizer.add_tokens(GPT4ROI_SPI_TOKENS, special_tokens=True)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            raise AnnotatorError(f"{path}: its tokenizer lacks GPT4RoI's special tokens (<im_patch>, <bbox>, ...)")

        # app.py: the CLIP tower is kept in a plain list (LLaVA's FSDP hack), so .to() on the model misses it, and
        # low_cpu_mem_usage may leave it on the meta device: reload it then, and move it by hand.
        vision_tower = model.get_model().vision_tower[0]
        if vision_tower.device.type == "meta":
            vision_tower = from_pretrained(
                CLIPVisionModel, vision_tower.config._name_or_path, torch_dtype=dtype, low_cpu_mem_usage=True
            )
            model.get_model().vision_tower[0] = vision_tower
        vision_tower.to(device=device, dtype=dtype)
        vision_config = vision_tower.config
        vision_config.im_patch_token = tokenizer.convert_tokens_to_ids([GPT4ROI_IMAGE_PATCH_TOKEN])[0]
        vision_config.use_im_start_end = True
        vision_config.im_start_token, vision_config.im_end_token = tokenizer.convert_tokens_to_ids(
            [GPT4ROI_IM_START_TOKEN, GPT4ROI_IM_END_TOKEN]
        )
        # app.py run: SPILlavaLlamaModel.forward finds the <bbox> positions through self.tokenizer.
        model.model.tokenizer = tokenizer

        # app.py init_inputs -> train.preprocess_multimodal (<image> -> <im_start> 256 x <im_patch> <im_end>) ->
        # train.preprocess (LLaVA v0 template: "{system}\n\n### Human: {question}\n### "), first sequence.
        token_len = (GPT4ROI_IMAGE_SIZE // GPT4ROI_PATCH_SIZE) ** 2
        sources = [[{"from": "human", "value": gpt4roi_question(self.prompt)}]]
        sources = upstream_train.preprocess_multimodal(sources, dict(GPT4ROI_MULTIMODAL_CFG), token_len)
        input_ids = torch.as_tensor(upstream_train.preprocess(sources, tokenizer)["input_ids"][0]).reshape(1, -1)
        bbox_id = tokenizer.convert_tokens_to_ids([GPT4ROI_SPI_TOKENS[0]])[0]
        end_id = vision_config.im_end_token
        if int((input_ids == bbox_id).sum()) != 1 or int((input_ids == end_id).sum()) != 1:
            raise AnnotatorError(
                f"gpt4roi prompt {self.prompt!r} did not tokenise to one image and one <bbox> token (truncated?)"
            )

        self._tokenizer, self._image_processor, self._prompt_ids = tokenizer, image_processor, input_ids
        self._device, self._dtype = device, dtype
        self._model = model
        logger.info("loaded GPT4RoI %s on %s (%s)", path, device, dtype)

    def __call__(
        self, images: Sequence[Image.Image], boxes_per_image: Sequence[Any]
    ) -> list[list[list[RegionCaption]]]:
        """One caption (possibly none, when the answer is empty) per box; all boxes of the call in batches of
        ``batch_size`` (class docstring)."""
        if self._model is None:
            raise AnnotatorError("gpt4roi is not loaded: call load() first")
        boxes, jobs = _flatten(images, boxes_per_image)
        pixels = {i: self._pixels(images[i]) for i in sorted({i for i, _ in jobs})}
        flat: list[list[RegionCaption]] = []
        for batch in chunks(jobs, self.batch_size):
            relative = [gpt4roi_boxes(box, *images[i].size)[0] for i, box in batch]
            answers = self._generate([pixels[i] for i, _ in batch], relative)
            flat += [[RegionCaption(text=t, annotator=self.name) for t in clean_texts([a])] for a in answers]
        return _regroup(boxes, flat)

    def _pixels(self, image: Image.Image) -> Any:
        """(3, 224, 224) pixels as app.py ``init_inputs``: CLIPImageProcessor without centre crop (shortest side to
        224, aspect kept), then bilinear-stretched to 224 x 224."""
        import torch.nn.functional as F

        pixel_values = self._image_processor.preprocess(
            image.convert("RGB"), do_center_crop=False, return_tensors="pt"
        )["pixel_values"][0]
        size = (GPT4ROI_IMAGE_SIZE, GPT4ROI_IMAGE_SIZE)
        return F.interpolate(pixel_values.unsqueeze(0), size=size, mode="bilinear", align_corners=False).squeeze(0)

    def _generate(self, pixels: Sequence[Any], boxes: Sequence[np.ndarray]) -> list[str]:
        """One ``generate`` over ``len(pixels)`` rows (image i with its one relative box i) -> cleaned answers.

        As app.py ``run``: the boxes reach ``SPILlavaMPTForCausalLM.forward`` through a ``functools.partial`` on
        ``model.forward`` (``generate``'s ``prepare_inputs_for_generation`` passes only ``images`` on), restored
        afterwards; ``img_metas`` is ``[None]`` per row; half-precision runs under CUDA autocast.
        """
        import torch

        model, tokenizer, n = self._model, self._tokenizer, len(pixels)
        input_ids = self._prompt_ids.repeat(n, 1).to(self._device)
        images = torch.stack(list(pixels)).to(device=self._device, dtype=self._dtype)
        bboxes = [torch.as_tensor(b, dtype=torch.float32).reshape(1, 4).to(self._device, self._dtype) for b in boxes]
        eos_id = tokenizer.eos_token_id
        stop = StopWhenAllAnswered(tokenizer, input_ids.shape[1], GPT4ROI_STOP, eos_id)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
        autocast = self._device.type == "cuda" and self._dtype != torch.float32
        model.forward = partial(model.forward, img_metas=[None] * n, bboxes=bboxes)
        try:
            with torch.inference_mode(), torch.autocast(self._device.type, dtype=self._dtype, enabled=autocast):
                output_ids = model.generate(
                    input_ids,
                    images=images,
                    do_sample=False,
                    num_beams=1,
                    max_new_tokens=self.max_new_tokens,
                    pad_token_id=pad_id,
                    stopping_criteria=[stop],
                )
        finally:
            del model.forward  # back to the class's forward (app.py: model.forward = model.orig_forward)
        texts = tokenizer.batch_decode(output_ids[:, input_ids.shape[1] :], skip_special_tokens=True)
        if len(texts) != n:
            raise RuntimeError(f"gpt4roi generate returned {len(texts)} sequences for {n} boxes")
        return [gpt4roi_answer(t) for t in texts]
