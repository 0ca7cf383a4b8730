"""Training step time and MFU of a CLIP ViT-B/16 (open_clip, random weights) in bf16 autocast.

One step = forward of both towers on a batch of images and captions, the CLIP contrastive loss, backward and an
AdamW update. FLOPs per step are counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` over one
forward + backward (the optimizer's element-wise work is not counted). MFU = counted FLOPs per step / step time /
the device's peak dense bf16 FLOP/s (``--peak-tflops``; defaults for known GPUs below).

Usage: ``python benchmarks/train_step_mfu.py --device cuda --batch 256`` (about a minute on one H200);
``python benchmarks/train_step_mfu.py --tiny --device cpu`` checks the script (its MFU means nothing).
"""

from __future__ import annotations

import argparse
import time

import torch

#: Peak dense bf16 tensor-core TFLOP/s from the vendors' data sheets (no sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)


def main(argv: list[str] | None = None) -> float | None:
    import open_clip
    from open_clip.loss import ClipLoss
    from torch.utils.flop_counter import FlopCounterMode

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps after 3 warm-up steps")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer ViT: checks the script only")
    parser.add_argument("--peak-tflops", type=float, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device (use --tiny --device cpu to check)")
    name = "ViT-B-16"
    if args.tiny:
        cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
               "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 2, "layers": 2}}
        model = open_clip.CLIP(**cfg)
        size, context, vocab = 64, 16, 1000
    else:
        model = open_clip.create_model(name, pretrained=None)
        size, context, vocab = 224, 77, 49408
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")
    loss_fn = ClipLoss()
    images = torch.randn(args.batch, 3, size, size, device=device)
    texts = torch.randint(0, vocab, (args.batch, context), device=device)
    autocast = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            image_features, text_features, logit_scale = model(images, texts)
            loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    achieved = flops / seconds / 1e12
    label = f"{'tiny CLIP' if args.tiny else name} batch {args.batch} {'bf16' if autocast else 'fp32'} on {device}"
    print(f"{label}: {seconds * 1e3:.1f} ms/step, {args.batch / seconds:.0f} images/s, "
          f"{flops / 1e12:.2f} TFLOP/step counted, {achieved:.1f} TFLOP/s")
    peak = peak_tflops(device, args.peak_tflops)
    if peak is None:
        print("MFU: n/a (unknown peak; pass --peak-tflops)")
        return None
    mfu = achieved / peak
    print(f"MFU vs {peak:.0f} TFLOP/s peak bf16: {mfu:.3f}")
    return mfu


if __name__ == "__main__":
    main()
