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

``--engine vllm`` puts the engine in place of the Hugging Face shared prefix: the same ``vlm-box`` config with
``engine: vllm`` (annotators/vllm_engine.py: every job of a call in one ``LLM.generate``, automatic prefix caching)
against the HF per-job path. The sides run one after the other (the HF model is freed before vLLM takes the
GPU), each timed on images it has not seen (vLLM's prefix cache would otherwise remember the warm-up's images);
at ``--paper-scale`` vLLM gets the model's config with ``load_format: dummy`` (random weights of its own), so only
the tiny models' captions are compared. Needs vllm importable (its own venv, docker/Dockerfile.cuda: run this
script with /opt/vllm-venv/bin/python) and, for vLLM's kernels, a GPU.

Usage: ``python benchmarks/region_captions.py`` (CPU, both tiny geometries);
``python benchmarks/region_captions.py --paper-scale --device cuda --dtype bfloat16 --images 4``;
``/opt/vllm-venv/bin/python benchmarks/region_captions.py --engine vllm --paper-scale --device cuda --dtype bfloat16``.
Last line: per-job time / shared time of the last geometry (> 1: the shared prefix is faster), with ``--engine
vllm`` per-job time / vLLM time.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
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


def build(model_dir: str | None, shared: bool, args, in_memory=None, **engine) -> VlmBoxCaptioner:
    """The benchmark's ``vlm-box`` captioner, loaded: from ``model_dir``, or around the ``in_memory`` (model,
    processor); ``engine``: ``engine`` / ``engine_kwargs`` config keys (vLLM loads ``model_dir`` itself)."""
    captioner = VlmBoxCaptioner(
        model=model_dir or "in-memory", box_format="llava-1.5", prompts="region", prompts_per_region=args.prompts,
        max_new_tokens=args.new_tokens, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
        shared_prefix=shared, **engine,
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


def timed(captioner: VlmBoxCaptioner, scene_sets: list, device: torch.device) -> tuple[list, float]:
    """Captions of the first scene set (the warm-up) and the best time over the others, each new to the captioner."""
    texts, times = None, []
    for n, (images, boxes) in enumerate(scene_sets):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = captioner(images, boxes)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if n == 0:
            texts = [[[c.text for c in caps] for caps in per_image] for per_image in out]
        else:
            times.append(time.perf_counter() - start)
    return texts, min(times)


def compare_engine(label: str, model_dir: str, args, in_memory=None) -> float:
    """HF job by job, then the vLLM engine (prefix caching on) on the same scene sets: per-job time / vLLM time."""
    scene_sets = []
    for r in range(args.repeats + 1):  # set 0: warm-up; seeds apart so no set repeats an image
        scenes = [random_scene(args.boxes, args.width, args.height, 1000 * r + i) for i in range(args.images)]
        scene_sets.append(([s[0] for s in scenes], [s[1] for s in scenes]))
    device = torch.device(args.device)
    hf = build(None if in_memory else model_dir, False, args, in_memory)
    hf_texts, per_job = timed(hf, scene_sets, device)
    del hf
    if in_memory is not None:
        in_memory[0].to("meta")  # drop the HF weights from the GPU in place (the caller still holds the model)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    engine_kwargs = {"gpu_memory_utilization": args.gpu_memory_utilization, "seed": 0}
    if args.paper_scale:
        engine_kwargs["load_format"] = "dummy"  # random weights from the config (vLLM's own init)
    vllm_side = build(model_dir, True, args, engine="vllm", engine_kwargs=engine_kwargs)
    vllm_texts, engine_time = timed(vllm_side, scene_sets, device)
    n_jobs = args.images * args.boxes * args.prompts
    if args.paper_scale:
        same = "not compared (vLLM's dummy weights are not the HF model's random weights)"
    else:
        box_pairs = [(a, b) for x, y in zip(hf_texts, vllm_texts, strict=True) for a, b in zip(x, y, strict=True)]
        same = f"{sum(a == b for a, b in box_pairs)} of {len(box_pairs)} boxes equal"
    print(f"{label}: {args.images} images x {args.boxes} boxes x {args.prompts} prompts = {n_jobs} jobs: "
          f"HF per-job (batch {args.batch_size}) {per_job:.3f} s, vLLM (prefix caching, one generate) "
          f"{engine_time:.3f} s; captions: {same}")
    return per_job / engine_time


def save_for_engine(in_memory, out_dir: str) -> str:
    """The in-memory model's config and processor in ``out_dir`` (no weights: vLLM loads with ``load_format:
    dummy``)."""
    model, processor = in_memory
    model.config.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


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
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                        help="shared side: hf (annotators/shared_prefix.py) or vllm (annotators/vllm_engine.py)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.8,
                        help="--engine vllm: the share of GPU memory vLLM may take (after the HF side is freed)")
    args = parser.parse_args(argv)
    if args.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        print(f"error: --engine vllm needs the vllm package, which {sys.executable} cannot import; run this script "
              "with vLLM's own environment (/opt/vllm-venv/bin/python of docker/Dockerfile.cuda)", file=sys.stderr)
        raise SystemExit(2)
    torch.set_num_threads(args.threads)
    run = compare_engine if args.engine == "vllm" else compare

    with tempfile.TemporaryDirectory(prefix="region-captions-") as tmp:
        if args.paper_scale:
            device = torch.device(args.device)
            in_memory = paper_scale_llava(device, getattr(torch, args.dtype), tuple(args.paper_layers))
            model_dir = save_for_engine(in_memory, tmp) if args.engine == "vllm" else None
            ratio = run("LLaVA-1.5-7B shape, random weights", model_dir, args, in_memory)
        else:
            for name in list(GEOMETRIES) if args.geometry == "all" else [args.geometry]:
                side, patch = GEOMETRIES[name]
                model_dir = str(Path(tmp) / name)
                write_tiny_llava(model_dir, image_size=side, patch_size=patch)
                ratio = run(f"tiny LLaVA, {name} geometry ({(side // patch) ** 2} image tokens)", model_dir, args)
    if args.engine == "vllm":
        print(f"HF per-job / vLLM engine: {ratio:.2f}x")
        return ratio
    print(f"per-job / shared prefix: {ratio:.2f}x")
    return ratio


if __name__ == "__main__":
    main()
