"""Region captions from a shared image prefix vs job by job: ``vlm-box`` on ``--boxes`` boxes x ``--prompts``
prompts per image, the same captioner config run both ways in one process (``shared_prefix: false`` / ``true``).

Job by job, every (box, prompt) job preprocesses its image, runs the vision tower and fills the whole prompt
(image tokens + chat template + box prompt) before it writes its few new tokens. With the shared prefix
(``annotators/shared_prefix.py``) each image is preprocessed and encoded once and its prompt prefix filled once;
every job continues from that prefix's cache, held once per image (``annotators/cascade_attention.py``). Both sides
must give the same greedy captions (checked here).

The tiny random LLaVA comes in two geometries: the test model's (32 px, patch 8: 16 image tokens) and
LLaVA-1.5's (336 px, patch 14: 576 image tokens, the prefix the paper-scale captioner pays for on every job), both
with the tiny 2-layer width-32 towers. ``--paper-scale`` instead builds a LLaVA-1.5-7B-shaped model with random
weights in memory (CLIP ViT-L/14-336 + LLaMA-7B; needs a GPU).

Usage: ``python benchmarks/region_captions.py`` (CPU, both tiny geometries);
``python benchmarks/region_captions.py --paper-scale --device cuda --dtype bfloat16 --images 4``.
Last line: per-job time / shared time of the last geometry (> 1: the shared prefix is faster).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from annotators._hf import write_tiny_llava
from annotators.region_captioner import VlmBoxCaptioner

GEOMETRIES = {"tiny": (32, 8), "llava-1.5": (336, 14)}  # (image side, patch) of the tiny LLaVA


def random_scene(n_boxes: int, width: int, height: int, seed: int) -> tuple[Image.Image, np.ndarray]:
    """A noise image and ``n_boxes`` boxes (10-60 % of each side) inside it."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
    wh = rng.uniform(0.1, 0.6, size=(n_boxes, 2)) * (width, height)
    xy = rng.uniform(0, 1, size=(n_boxes, 2)) * ((width, height) - wh)
    return image, np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def paper_scale_llava(device: torch.device, dtype: torch.dtype, layers: tuple[int, int] = (24, 32)):
    """A LLaVA-1.5-7B-shaped ``LlavaForConditionalGeneration`` (CLIP ViT-L/14 at 336, LLaMA-7B) with random weights
    and a processor around the tiny tokenizer: the paper-scale compute, built in memory (no weights to download).
    ``layers``: (vision, text) depth; fewer only to check the script on a CPU."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers import LlavaProcessor

    from annotators._hf import TINY_CHAT_TEMPLATE, token_config
    from annotators.tiny_text import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(extra_special_tokens=["<image>"])
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
        chat_template=TINY_CHAT_TEMPLATE, num_additional_image_tokens=1,
    )
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers[0], num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers[1], num_attention_heads=32,
                       num_key_value_heads=32, max_position_embeddings=4096, **token_config(tokenizer))
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default")
    with torch.device(device):  # initialised in place (buffers such as position ids and rotary frequencies too)
        model = LlavaForConditionalGeneration(config).to(dtype).eval()
    tokenizer.padding_side = "left"
    return model, processor


def build(model_dir: str | None, shared: bool, args, in_memory=None) -> VlmBoxCaptioner:
    captioner = VlmBoxCaptioner(
        model=model_dir or "in-memory", box_format="llava-1.5", prompts="region", prompts_per_region=args.prompts,
        max_new_tokens=args.new_tokens, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
        shared_prefix=shared,
    )
    if in_memory is None:
        captioner.load()
        return captioner
    from annotators import box_prompt
    from annotators._devices import resolve_device, resolve_dtype

    generator = captioner.generator  # what ImageTextGenerator.load() sets, from the in-memory model
    generator.model, generator.processor = in_memory
    generator.device, generator.dtype = resolve_device(args.device), resolve_dtype(args.dtype, resolve_device(args.device))
    generator.gen_kwargs.setdefault("pad_token_id", generator.processor.tokenizer.pad_token_id)
    captioner.frame = box_prompt.ProcessorFrame.from_processor(generator.processor.image_processor)
    return captioner


def compare(label: str, model_dir: str | None, args, in_memory=None) -> float:
    scenes = [random_scene(args.boxes, args.width, args.height, seed) for seed in range(args.images)]
    images, boxes = [s[0] for s in scenes], [s[1] for s in scenes]
    sides = {shared: build(model_dir, shared, args, in_memory) for shared in (False, True)}
    device = torch.device(args.device)
    texts, times = {}, {False: [], True: []}
    for shared, captioner in sides.items():  # warm-up (and the captions to compare)
        texts[shared] = [[[c.text for c in caps] for caps in per_image] for per_image in captioner(images, boxes)]
    for _ in range(args.repeats):
        for shared, captioner in sides.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            captioner(images, boxes)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[shared].append(time.perf_counter() - start)
    per_job, shared = min(times[False]), min(times[True])
    n_jobs = args.images * args.boxes * args.prompts
    equal = texts[False] == texts[True]
    box_pairs = [(a, b) for x, y in zip(texts[False], texts[True], strict=True) for a, b in zip(x, y, strict=True)]
    differ = "" if equal else f" ({sum(a != b for a, b in box_pairs)} of {len(box_pairs)} boxes differ)"
    print(f"{label}: {args.images} images x {args.boxes} boxes x {args.prompts} prompts = {n_jobs} jobs, "
          f"batch {args.batch_size}: per-job {per_job:.3f} s, shared prefix {shared:.3f} s, "
          f"captions equal: {equal}{differ}")
    return per_job / shared


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", choices=[*GEOMETRIES, "all"], default="all")
    parser.add_argument("--paper-scale", action="store_true", help="LLaVA-1.5-7B shape, random weights (GPU)")
    parser.add_argument("--paper-layers", type=int, nargs=2, default=(24, 32), metavar=("VISION", "TEXT"),
                        help="depth of the --paper-scale towers (fewer: a CPU check of the script only)")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--boxes", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.paper_scale:
        device = torch.device(args.device)
        in_memory = paper_scale_llava(device, getattr(torch, args.dtype), tuple(args.paper_layers))
        ratio = compare("LLaVA-1.5-7B shape, random weights", None, args, in_memory)
    else:
        names = list(GEOMETRIES) if args.geometry == "all" else [args.geometry]
        with tempfile.TemporaryDirectory(prefix="region-captions-") as tmp:
            for name in names:
                side, patch = GEOMETRIES[name]
                model_dir = str(Path(tmp) / name)
                write_tiny_llava(model_dir, image_size=side, patch_size=patch)
                ratio = compare(f"tiny LLaVA, {name} geometry ({(side // patch) ** 2} image tokens)", model_dir, args)
    print(f"per-job / shared prefix: {ratio:.2f}x")
    return ratio


if __name__ == "__main__":
    main()
