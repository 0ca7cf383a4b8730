"""Images enter Ray once: pixel bytes sent per image and throughput on 12 MP images, before and after.

The chain of ``configs/smoke.yaml`` (tiny real backends: tagger, BLIP-2 captioner, scorer, two detectors, crop
region captioner; ``--masks`` adds SAM + stability and the background, whose full-resolution masks and their RLE
take minutes per 12 MP image on 2 cores, the same on every side), one Ray actor pool per stage (``ray.mode:
stages``), annotates the same ``--n`` images of ``--width x --height`` (decoded once, before timing) three ways,
in this process:

- pickled (before): every actor call pickles its images into its arguments (``ray.share_images: false``);
- shared (after): each image is put into the object store once, every pool gets its reference;
- shared + max_side: as shared, and the image-level stages (tagger, captioner, scorer) get the image downscaled
  to ``--max-side`` at the source.

Printed per way: pixel bytes this process sent per image (``pipeline.ray_images.STATS``: put once, or pickled
into calls), images/s through the chain (actors already loaded) and identical records. The last line is the
throughput ratio shared / pickled.

    .venv/bin/python benchmarks/image_transfer.py [--n 8] [--width 4000 --height 3000]
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray_runtime  # noqa: E402
from data_schemas import ImageLimits, load_config  # noqa: E402
from data_schemas.config import IMAGE_LEVEL_KINDS  # noqa: E402
from pipeline import ray_images  # noqa: E402
from pipeline.ingest import ingest_item  # noqa: E402
from pipeline.ray_pool import build_ray_chain  # noqa: E402
from pipeline.sources.base import SourceItem  # noqa: E402


def photo_like(width: int, height: int, seed: int) -> bytes:
    """A JPEG of smooth colour gradients with a few rectangles and mild noise (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * rng.uniform(80, 200, 3)
    image = base.astype(np.uint8)
    for _ in range(4):
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        image[y0:y0 + height // 4, x0:x0 + width // 4] = rng.integers(0, 256, 3)
    image = np.clip(image + rng.integers(0, 8, image.shape, dtype=np.uint8), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def run(chain, jpegs: list[bytes], limits: ImageLimits, share: bool,
        max_side: dict[str, int]) -> tuple[float, ray_images.TransferStats, list]:
    """Images/s, bytes sent and records of ``chain`` (its pools set to ``share`` / ``max_side`` per stage)."""
    for pool in chain.pools:
        pool.share_images, pool.max_side = share, max_side.get(pool.label)
    items = [ingest_item(SourceItem(f"k{i}", f"k{i}.jpg", data), "bench", limits) for i, data in enumerate(jpegs)]
    ray_images.STATS.reset()
    started = time.perf_counter()
    chain.run(items)
    seconds = time.perf_counter() - started
    stats = ray_images.TransferStats(**vars(ray_images.STATS))
    records = [(it.error, it.record.model_dump_json(exclude={"provenance"})) for it in items]
    return len(items) / seconds, stats, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--max-side", type=int, default=512, help="image-level stages' source resize")
    parser.add_argument("--config", default=str(ROOT / "configs" / "smoke.yaml"))
    parser.add_argument("--masks", action="store_true", help="keep the segmenter and background stages")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    overrides = ["ray.mode=stages", "ray.resources={}", "ray.batch_size=4", "ray.max_in_flight=2",
                 "ray.actor_start_timeout_s=1800", "ray.default.num_cpus=0.25"]
    if not args.masks:
        overrides += ["annotate.segmenter=null", "annotate.background=null"]
    cfg = load_config(args.config, overrides)
    limits = cfg.images
    jpegs = [photo_like(args.width, args.height, seed) for seed in range(args.n)]
    mp = args.width * args.height / 1e6
    image_level = {stage: args.max_side for stage, (kind, _) in cfg.annotate.model_stages().items()
                   if kind in IMAGE_LEVEL_KINDS}
    ways = {"pickled": (False, {}), "shared": (True, {}), f"shared + max_side {args.max_side}": (True, image_level)}
    with tempfile.TemporaryDirectory(prefix="umg-transfer-bench-") as tmp:
        ray_runtime.start_ray(None, num_cpus=2, _temp_dir=tmp, log_to_driver=False)
        import ray

        results = {}
        try:  # one set of actors for every way (their start-up is not what is measured)
            chain = build_ray_chain(cfg.annotate, cfg.ray)
            try:
                run(chain, jpegs[:1], limits, True, {})  # warm-up: first calls load lazily initialised parts
                for name, (share, max_side) in ways.items():
                    results[name] = run(chain, jpegs, limits, share, max_side)
            finally:
                chain.close()
        finally:
            ray.shutdown()
    print(f"{args.n} images of {args.width}x{args.height} ({mp:.1f} MP, {args.width * args.height * 3 / 2**20:.1f} MiB "
          f"RGB), smoke chain{'' if args.masks else ' without the mask stages'}, one pool per stage: "
          f"{', '.join(cfg.annotate.model_stages())}")
    for name, (rate, stats, records) in results.items():
        per_image = (stats.put + stats.inline) / args.n
        print(f"{name:26s}: {per_image / 2**20:7.1f} MiB of pixels sent per image (put {stats.put / args.n / 2**20:.1f}, "
              f"in call arguments {stats.inline / args.n / 2**20:.1f}; {stats.calls} actor calls), "
              f"{rate:.3f} images/s; same records as pickled: {records == results['pickled'][2]}")
    before, after = results["pickled"], results["shared"]
    print(f"bytes ratio pickled/shared: {(before[1].put + before[1].inline) / (after[1].put + after[1].inline):.1f}x")
    print(f"throughput ratio shared/pickled: {after[0] / before[0]:.2f}")


if __name__ == "__main__":
    main()
