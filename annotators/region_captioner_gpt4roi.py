"""GPT4RoI region captioner (``gpt4roi``): the paper's region captioner, run through its own (non-PyPI) code.

Each box is asked each region prompt (the built-in set ``gpt4roi_region``: 5 of GPT4RoI's own region-caption
training questions, as the paper gives region captioners 5 prompts; "... region1 <bbox> ..."), the box entering as
RoI features from its coordinates relative to the image; the (box, prompt) jobs of a call are batched
``batch_size`` per ``generate``, one prompt per batch. GPT4RoI pins an old LLaVA /
transformers stack, so it runs in its own environment (``docker/Dockerfile.cuda`` builds ``/opt/gpt4roi-venv``);
in this project's environment ``load()`` raises a clear error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from annotators._hf import check_model_path, chunks, clean_pairs, from_pretrained, resolve_device, resolve_dtype
from annotators.base import AnnotatorError, Backend, require
from annotators.prompts import PromptChoice, image_digest, load_prompts
from annotators.region_captioner import _flatten, _regroup
from data_schemas import RegionCaption

logger = logging.getLogger(__name__)

GPT4ROI_EXTRA = (
    "GPT4RoI is not on PyPI and its LLaVA fork pins an old transformers; use the GPT4RoI venv of the CUDA worker "
    "image (docker/Dockerfile.cuda: /opt/gpt4roi-venv, a checkout of github.com/jshilong/GPT4RoI with mmcv and mmdet)"
)

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
# Region-caption questions from the training set: FINAL_QUESTIONS in gpt4roi/datasets/vg.py (= REFG_QUESTIONS in
# refcoco.py), whose answers are Visual Genome region descriptions / RefCOCOg expressions, i.e. short captions:
# five of them are the built-in prompt set ``gpt4roi_region`` (annotators/prompts/gpt4roi_region.txt).
GPT4ROI_PROMPTS = "gpt4roi_region"


def gpt4roi_question(prompt: str) -> str:
    """The one human turn of a GPT4RoI region prompt: app.py's preamble + ``prompt`` with ``{region}`` replaced by
    ``region1 <bbox>`` (one region per prompt, so it is always region1)."""
    return GPT4ROI_BEGIN + prompt.replace("{region}", GPT4ROI_REGION)


def check_gpt4roi_prompt(prompt: str) -> None:
    """``AnnotatorError`` unless ``prompt`` has exactly one ``{region}`` and none of GPT4RoI's reserved tokens."""
    if prompt.count("{region}") != 1:
        raise AnnotatorError(f"gpt4roi prompt {prompt!r} needs exactly one '{{region}}' placeholder")
    reserved = [t for t in ("<image>", "<bbox>", "<point>", "<region") if t in prompt]
    if reserved:
        raise AnnotatorError(
            f"gpt4roi prompt {prompt!r} must not contain {reserved}: the box goes in through '{{region}}'"
        )


def box_key(box: np.ndarray) -> tuple[float, ...]:
    """A box as the sampling key of its prompts (plain floats: the same box draws the same prompts anywhere)."""
    return tuple(round(float(v), 3) for v in box)


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

    Each box is asked each of its prompts in a prompt of its own (``{region}`` -> ``region1 <bbox>``), built as
    gpt4roi/app.py ``ConversationBot.init_inputs`` builds its first turn and tokenised by upstream's
    ``gpt4roi.train.train.preprocess_multimodal`` / ``preprocess``. The prompts: by default every prompt of the
    ``gpt4roi_region`` set (5, in an order seeded by ``seed``, the image's content and the box); ``prompts`` (a
    set name, file or list) with ``prompts_per_region`` draws that many; ``prompt`` asks one fixed prompt. Jobs
    are batched: all (box, prompt) jobs of the call are grouped by prompt and generated ``batch_size`` at a time
    in one ``generate`` (one sequence per job, with its image and its one box), which
    ``SPILlavaLlamaModel.forward`` supports (one image and one box list per row; its RoI extractor keeps the rows
    apart by index). The rows of a batch share one prompt, and the box enters only as RoI features, so they are
    token-identical and need no padding. Each image's pixels are computed once and shared by its jobs; the vision
    tower still runs once per row, as upstream's forward does.

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
        prompt: str | None = None,
        prompts: str | list[str] | None = None,
        prompts_per_region: int | None = None,
        seed: int = 0,
        max_new_tokens: int = 64,
        device: str = "auto",
        dtype: str = "float16",
        batch_size: int = 8,
    ) -> None:
        if prompt is None:
            prompts = GPT4ROI_PROMPTS if prompts is None else prompts
            per_region = len(load_prompts(prompts)) if prompts_per_region is None else prompts_per_region
        else:
            check_gpt4roi_prompt(prompt)
            per_region = 1 if prompts_per_region is None else prompts_per_region
        self.prompts = PromptChoice(prompt, prompts, per_region, seed, default="", placeholder="{region}")
        for text in self.prompt_set:
            check_gpt4roi_prompt(text)
        if int(max_new_tokens) < 1 or int(batch_size) < 1:
            raise AnnotatorError(
                f"gpt4roi max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}"
            )
        self.model_path = str(model)
        self.max_new_tokens, self.batch_size = int(max_new_tokens), int(batch_size)
        self.device_name, self.dtype_name = device, dtype
        self._model: Any = None
        self._tokenizer: Any = None
        self._image_processor: Any = None
        self._prompt_ids: dict[str, Any] = {}  # prompt -> (1, L) int64: the token-identical rows that ask it
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

    @property
    def prompt_set(self) -> list[str]:
        """Every prompt this captioner may ask."""
        sampler = self.prompts.sampler
        return [self.prompts.prompt] if sampler is None else list(sampler.prompts)

    def load(self) -> None:
        """Load model, tokenizer and image processor as gpt4roi/app.py ``ConversationBot.build_model`` does (same
        steps as gpt4roi/cli_demo.py ``eval_model``), then tokenise each prompt once."""
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
        bbox_id = tokenizer.convert_tokens_to_ids([GPT4ROI_SPI_TOKENS[0]])[0]
        end_id = vision_config.im_end_token
        prompt_ids = {}
        for prompt in self.prompt_set:
            sources = [[{"from": "human", "value": gpt4roi_question(prompt)}]]
            sources = upstream_train.preprocess_multimodal(sources, dict(GPT4ROI_MULTIMODAL_CFG), token_len)
            input_ids = torch.as_tensor(upstream_train.preprocess(sources, tokenizer)["input_ids"][0]).reshape(1, -1)
            if int((input_ids == bbox_id).sum()) != 1 or int((input_ids == end_id).sum()) != 1:
                raise AnnotatorError(
                    f"gpt4roi prompt {prompt!r} did not tokenise to one image and one <bbox> token (truncated?)"
                )
            prompt_ids[prompt] = input_ids

        self._tokenizer, self._image_processor, self._prompt_ids = tokenizer, image_processor, prompt_ids
        self._device, self._dtype = device, dtype
        self._model = model
        logger.info("loaded GPT4RoI %s on %s (%s)", path, device, dtype)

    def __call__(
        self, images: Sequence[Image.Image], boxes_per_image: Sequence[Any]
    ) -> list[list[list[RegionCaption]]]:
        """Per box the distinct non-empty answers to its prompts, each recording its prompt; all (box, prompt)
        jobs of the call grouped by prompt, in batches of ``batch_size`` (class docstring)."""
        if self._model is None:
            raise AnnotatorError("gpt4roi is not loaded: call load() first")
        boxes, flat_boxes = _flatten(images, boxes_per_image)
        keys = {i: image_digest(images[i]) for i in sorted({i for i, _ in flat_boxes})}
        pixels = {i: self._pixels(images[i]) for i in keys}
        by_prompt: dict[str, list[tuple[int, int, np.ndarray]]] = {}  # prompt -> (flat box index, image, box)
        for flat_index, (i, box) in enumerate(flat_boxes):
            for prompt in self.prompts.for_item(keys[i], *box_key(box)):
                by_prompt.setdefault(prompt, []).append((flat_index, i, box))
        answers: list[dict[str, str]] = [{} for _ in flat_boxes]  # per box: prompt -> answer
        for prompt, jobs in by_prompt.items():
            for batch in chunks(jobs, self.batch_size):
                relative = [gpt4roi_boxes(box, *images[i].size)[0] for _, i, box in batch]
                texts = self._generate(self._prompt_ids[prompt], [pixels[i] for _, i, _ in batch], relative)
                for (flat_index, _, _), text in zip(batch, texts, strict=True):
                    answers[flat_index][prompt] = text
        flat = []
        for (i, box), per_prompt in zip(flat_boxes, answers, strict=True):
            asked = self.prompts.for_item(keys[i], *box_key(box))  # the box's own prompt order
            pairs = clean_pairs((per_prompt[p], p) for p in asked)
            flat.append([RegionCaption(text=t, annotator=self.name, prompt=p) for t, p in pairs])
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

    def _generate(self, prompt_ids: Any, pixels: Sequence[Any], boxes: Sequence[np.ndarray]) -> list[str]:
        """One ``generate`` over ``len(pixels)`` rows, each the prompt ``prompt_ids`` (1, L) with image i and its one
        relative box i -> cleaned answers.

        As app.py ``run``: the boxes reach ``SPILlavaMPTForCausalLM.forward`` through a ``functools.partial`` on
        ``model.forward`` (``generate``'s ``prepare_inputs_for_generation`` passes only ``images`` on), restored
        afterwards; ``img_metas`` is ``[None]`` per row; half-precision runs under CUDA autocast.
        """
        import torch

        model, tokenizer, n = self._model, self._tokenizer, len(pixels)
        input_ids = prompt_ids.repeat(n, 1).to(self._device)
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
