"""Per-stage model throughput of the paper-scale annotation chain, with random weights (same compute as the
released ones), for the capacity plan in docs/scale.md.

Each stage is timed on the architecture (or the compute-equivalent part) its backend runs:

| stage | what is timed |
|---|---|
| tagger (RAM++ Swin-L 384) | timm ``swin_large_patch4_window12_384`` forward |
| scorer (EVA02-L-14) | open_clip ``EVA02-L-14`` image encoder |
| detectors (ViTDet-H 1024) and segmenter (SAM ViT-H) | segment_anything ViT-H image encoder at 1024 (the windowed ViTDet backbone) |
| captioners / region captioners (7B decoders) | a LLaMA-7B-shaped transformers model: prefill of the image + prompt tokens, then greedy decode |

``--tiny`` shrinks every model (CPU check of the script itself; its figures mean nothing). Prints one line per
stage, the images/s per GPU they imply, and the slowest stage last.

Usage: ``python benchmarks/stage_throughput.py --device cuda`` (about 3 minutes on one H200);
``python benchmarks/stage_throughput.py --tiny --device cpu`` (seconds).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
from sam_batching import best_time  # benchmarks/ is on sys.path when run as a script

REGIONS_PER_IMAGE = 389.13 / 41.41  # UMG-41M: 389.13M regions over 41.41M images (paper Table 1)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Best wall seconds of ``fn`` over ``repeats`` runs after one warm-up (CUDA synchronised)."""
    fn()
    return best_time(fn, repeats, device)


def vision_rate(model: torch.nn.Module, size: int, batch: int, device, dtype, repeats: int) -> float:
    """Images/s of ``model`` on ``batch`` random ``size``² images under autocast ``dtype``."""
    model = model.to(device).eval()
    pixels = torch.randn(batch, 3, size, size, device=device)
    autocast = device.type == "cuda" and dtype != torch.float32

    def run():
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=autocast):
            model(pixels)

    return batch / timed(run, device, repeats)


def swin_large(tiny: bool) -> tuple[torch.nn.Module, int]:
    import timm

    if tiny:
        return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=16), 224
    return timm.create_model("swin_large_patch4_window12_384", pretrained=False, num_classes=4585), 384


def eva_clip(tiny: bool) -> tuple[torch.nn.Module, int]:
    import open_clip

    model = open_clip.create_model("ViT-B-32" if tiny else "EVA02-L-14", pretrained=None)
    return model.visual, 224


def sam_encoder(tiny: bool) -> tuple[torch.nn.Module, int]:
    from segment_anything.modeling import ImageEncoderViT

    if tiny:
        return ImageEncoderViT(img_size=256, embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,),
                               window_size=8, out_chans=32), 256
    return ImageEncoderViT(img_size=1024, embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31),
                           window_size=14, out_chans=256, use_rel_pos=True), 1024


def decoder_rates(tiny: bool, device, dtype, batch: int, prompt_tokens: int, new_tokens: int,
                  repeats: int) -> tuple[float, float]:
    """(prompts/s, seconds per batch) of a LLaMA-7B-shaped decoder: prefill ``prompt_tokens`` then greedy decode
    ``new_tokens`` for ``batch`` prompts (KV cache on, as ``generate`` runs it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=512)
    else:  # LLaMA / Vicuna-7B: LLaVA-1.5-7B, Shikra-7B and GPT4RoI-7B decoders
        config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(dtype if device.type == "cuda" else torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    ids = torch.randint(0, config.vocab_size, (batch, prompt_tokens), device=device)

    def run():
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    seconds = timed(run, device, repeats)
    return batch / seconds, seconds


#: costs-file pools measured here -> the rate that stands for them (ViTDet-H: its ViT-H backbone only, a lower bound)
MEASURED_POOLS = {"tagger": "tagger (Swin-L 384)", "scorer": "scorer (EVA02-L-14 image)",
                  "segmenter": "segmenter / ViTDet-H backbone (ViT-H 1024)",
                  "detector_bigdet": "segmenter / ViTDet-H backbone (ViT-H 1024)"}


def write_costs(rates: dict[str, float], base: str, out: str, device: str, tiny: bool) -> None:
    """``base`` (a costs file) with the pools of ``MEASURED_POOLS`` at the measured seconds per image."""
    with open(base, encoding="utf-8") as handle:
        costs = json.load(handle)
    for pool, stage in MEASURED_POOLS.items():
        if pool in costs["stages"]:
            costs["stages"][pool].update(seconds_per_image=round(1 / rates[stage], 6),
                                         basis=f"measured: {stage}, benchmarks/stage_throughput.py on {device}"
                                               + (" (--tiny: meaningless)" if tiny else ""))
    measured = [p for p, c in costs["stages"].items() if c["basis"].startswith("measured:")]
    costs["measured"] = len(measured) == len(costs["stages"]) and not tiny
    costs["note"] = f"measured on {device}: {', '.join(measured)}; the rest from {base}: " + costs.get("note", "")
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(costs, handle, indent=1)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tiny", action="store_true", help="tiny models: checks the script, figures mean nothing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--costs-out", default=None, help="also write a costs file for `umg plan-resources`: "
                        "--costs-base with the measured vision stages' seconds per image replaced")
    parser.add_argument("--costs-base", default="configs/costs/umg41m_estimates.json")
    parser.add_argument("--caption-prompts", type=int, default=2, help="prompts per image (umg41m.yaml: 2)")
    parser.add_argument("--region-prompts", type=int, default=5, help="prompts per region (umg41m.yaml vlm-box: 5)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device (use --tiny --device cpu to check)")
    dtype = getattr(torch, args.dtype)
    vision_batch = 2 if args.tiny else 32
    rates: dict[str, float] = {}
    for stage, build, batch in (("tagger (Swin-L 384)", swin_large, vision_batch),
                                ("scorer (EVA02-L-14 image)", eva_clip, vision_batch * 2),
                                ("segmenter / ViTDet-H backbone (ViT-H 1024)", sam_encoder, max(1, vision_batch // 4))):
        model, size = build(args.tiny)
        rates[stage] = vision_rate(model, size, batch, device, dtype, args.repeats)
        print(f"{stage}: {rates[stage]:.1f} images/s")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    image_tokens = 16 if args.tiny else 576  # LLaVA-1.5: 24 x 24 CLIP patches
    caption_batch = 2 if args.tiny else 16
    per_prompt, seconds = decoder_rates(args.tiny, device, dtype, caption_batch, image_tokens + 32, 40, args.repeats)
    rates["captioner (7B, 576 image + 32 prompt tokens, 40 new)"] = per_prompt / args.caption_prompts
    print(f"captioner: {per_prompt:.2f} prompts/s = {per_prompt / args.caption_prompts:.2f} images/s at "
          f"{args.caption_prompts} prompts per image ({seconds:.2f} s per batch of {caption_batch})")
    region_batch = 4 if args.tiny else 32
    per_region, seconds = decoder_rates(args.tiny, device, dtype, region_batch, image_tokens + 48, 20, args.repeats)
    per_image = REGIONS_PER_IMAGE * args.region_prompts
    rates["region captioner (7B, box prompts, 20 new)"] = per_region / per_image
    print(f"region captioner: {per_region:.2f} prompts/s = {per_region / per_image:.3f} images/s at "
          f"{REGIONS_PER_IMAGE:.1f} regions x {args.region_prompts} prompts per image "
          f"({seconds:.2f} s per batch of {region_batch})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"device": str(device), "name": torch.cuda.get_device_name(device) if device.type == "cuda"
                       else "cpu", "tiny": args.tiny, "images_per_s": rates}, handle, indent=1)
    if args.costs_out:
        write_costs(rates, args.costs_base, args.costs_out, torch.cuda.get_device_name(device)
                    if device.type == "cuda" else "cpu", args.tiny)
    slowest = min(rates, key=rates.get)
    print(f"slowest stage: {slowest}: {rates[slowest]:.2f} images/s per device")
    return rates


if __name__ == "__main__":
    main()
