"""SAM batching: box prompts (one ``predict_torch`` call with N boxes vs N single-box calls), or with
``--encoder-images K`` the image encoder (``SamSegmenter`` on K images, ``encoder_batch`` K vs 1).

Both sides use the same image embedding (``set_image`` once, outside the timed region), so the figure is
the mask-decoder + post-processing throughput that ``SamSegmenter`` gains by batching an image's boxes.
Each side runs ``--repeats`` times alternately after one warm-up; the best time counts.

``--encoder-images K``: the segmenter is called on K images of ``--boxes`` boxes each, with the image encoder
batched across them vs one image per encoder pass (no embedding cache); last line: that throughput ratio.

Usage: ``python benchmarks/sam_batching.py`` (tiny random SAM on CPU) or
``python benchmarks/sam_batching.py --model-type vit_h --checkpoint sam_vit_h_4b8939.pth --device cuda``.
Last line: the throughput ratio batched / loop (> 1: batching is faster).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from annotators.segmenter import SamSegmenter


def random_boxes(n: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """``(n, 4)`` float32 xyxy boxes inside a ``width x height`` image, 10-50 % of each side."""
    rng = np.random.default_rng(seed)
    wh = rng.uniform(0.1, 0.5, size=(n, 2)) * (width, height)
    xy = rng.uniform(0, 1, size=(n, 2)) * ((width, height) - wh)
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def best_time(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def encoder_batching(segmenter: SamSegmenter, args: argparse.Namespace) -> float:
    """Seconds of ``segmenter(images, boxes)`` with ``encoder_batch`` K vs 1 (best of ``--repeats``); the ratio."""
    rng = np.random.default_rng(0)
    k = args.encoder_images
    images = [Image.fromarray(rng.integers(0, 256, size=(args.height, args.width, 3), dtype=np.uint8))
              for _ in range(k)]
    boxes = [random_boxes(args.boxes, args.width, args.height, seed=i) for i in range(k)]
    segmenter.embedding_cache = 0
    device = segmenter.predictor.device
    seconds = {}
    for batch in (1, k, 1, k):  # alternate; the first round is a warm-up
        segmenter.encoder_batch = batch
        seconds[batch] = min(seconds.get(batch, float("inf")),
                             best_time(lambda: segmenter(images, boxes), args.repeats, device))
    print(f"SAM {args.model_type} on {device} ({args.dtype}): {k} images {args.width}x{args.height}, "
          f"{args.boxes} boxes each")
    for batch in (1, k):
        print(f"encoder_batch {batch}: {seconds[batch]:.3f} s = {k / seconds[batch]:.2f} images/s")
    ratio = seconds[1] / seconds[k]
    print(f"throughput ratio encoder batched/one image at a time: {ratio:.2f}")
    return ratio


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-type", default="vit_tiny")
    parser.add_argument("--checkpoint", default=None, help="SAM state dict; default: a tiny random one")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--boxes", type=int, default=16)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--encoder-images", type=int, default=0, help="compare encoder batching on K images")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint is None:
            if args.model_type != "vit_tiny":
                parser.error("--checkpoint is required for real model types")
            cfg = SamSegmenter.create_tiny(tmp)
        else:
            cfg = {"backend": "sam", "model_type": args.model_type, "checkpoint": args.checkpoint}
        segmenter = SamSegmenter.from_config(cfg | {"device": args.device, "dtype": args.dtype})
        segmenter.load()
        if args.encoder_images:
            return encoder_batching(segmenter, args)

    predictor = segmenter.predictor
    device = predictor.device
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(args.height, args.width, 3), dtype=np.uint8))
    boxes = torch.as_tensor(random_boxes(args.boxes, args.width, args.height), device=device)
    transformed = predictor.transform.apply_boxes_torch(boxes, (args.height, args.width))
    with segmenter._autocast():
        predictor.set_image(np.asarray(image))

    def batched() -> None:
        with segmenter._autocast():
            predictor.predict_torch(None, None, boxes=transformed, multimask_output=False)

    def loop() -> None:
        with segmenter._autocast():
            for i in range(len(transformed)):
                predictor.predict_torch(None, None, boxes=transformed[i : i + 1], multimask_output=False)

    batched(), loop()  # warm-up
    batched_s = loop_s = float("inf")
    for _ in range(args.repeats):
        batched_s = min(batched_s, best_time(batched, 1, device))
        loop_s = min(loop_s, best_time(loop, 1, device))
    n = args.boxes
    print(f"SAM {args.model_type} on {device} ({args.dtype}), image {args.width}x{args.height}, {n} boxes")
    print(f"batched: 1 predict_torch call with {n} boxes: {batched_s * 1e3:.2f} ms, {n / batched_s:.1f} boxes/s")
    print(f"loop:    {n} predict_torch calls with 1 box:  {loop_s * 1e3:.2f} ms, {n / loop_s:.1f} boxes/s")
    ratio = loop_s / batched_s
    print(f"throughput ratio batched/loop: {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
