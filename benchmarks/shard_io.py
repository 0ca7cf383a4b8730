"""Shard I/O throughput against the `tarfile` module on the same bytes, in one process.

Reader: ``pipeline.shards.iter_samples`` (samples grouped by key) and ``iter_records`` (plus schema
validation of every record) vs. iterating the same tars with ``tarfile`` and reading every member.
Writer: ``ShardWriter`` (record JSON, manifest parquet, stats, fsync + atomic renames) vs. writing the
same member bytes with ``tarfile``. Each side runs ``--repeats`` times alternately; the best time counts.

Usage: ``python benchmarks/shard_io.py [--samples 2000] [--repeats 5]``. Last line: the ratios (goal >= 0.8).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from data_schemas import Caption, ImageRecord, Region, RegionCaption, Tag
from pipeline.shards import ShardWriter, iter_records, iter_samples


def make_samples(n: int, seed: int = 0) -> list[tuple[ImageRecord, bytes]]:
    """``n`` records with 4 regions and a 224x224 JPEG each (smooth noise, ~10-20 kB)."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        small = rng.integers(0, 255, size=(28, 28, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(small).resize((224, 224), Image.BILINEAR).save(buffer, format="JPEG", quality=90)
        jpg = buffer.getvalue()
        regions = [
            Region(id=r, box_xyxy=(10.0 * r, 5.0, 10.0 * r + 40, 60.0), label="seven", score=0.8, annotator="det",
                   captions=[RegionCaption(text=f"a red seven {j}", annotator="cap") for j in range(4)],
                   tags=[Tag(name="seven", annotator="tag")])
            for r in range(4)
        ]
        samples.append((ImageRecord(
            key=f"sample_{i:06d}", source="bench", source_id=f"{i}.jpg", width=224, height=224,
            sha256=hashlib.sha256(jpg).hexdigest(), tags=[Tag(name="seven", score=0.9, annotator="ram")],
            captions=[Caption(text=f"a photo of digits {j}", annotator="blip2", clip_score=0.3) for j in range(7)],
            regions=regions,
        ), jpg))
    return samples


def write_ours(out: Path, samples, per_shard: int) -> None:
    for start in range(0, len(samples), per_shard):
        with ShardWriter(out, f"{start // per_shard:05d}") as writer:
            for record, jpg in samples[start : start + per_shard]:
                writer.write(record, jpg)
            writer.commit()


def write_tarfile(out: Path, samples, per_shard: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(samples), per_shard):
        with tarfile.open(out / f"{start // per_shard:05d}.tar", "w") as tar:
            for record, jpg in samples[start : start + per_shard]:
                for ext, payload in (("jpg", jpg), ("txt", record.best_caption().encode()),
                                     ("json", record.model_dump_json().encode())):
                    info = tarfile.TarInfo(f"{record.key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def read_tarfile(tars: list[Path]) -> int:
    count = 0
    for path in tars:
        with tarfile.open(path, "r|") as tar:
            for info in tar:
                tar.extractfile(info).read()
                count += 1
    return count


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    samples = make_samples(args.samples)
    root = Path(tempfile.mkdtemp(prefix="shard_io_"))
    try:
        ours_runs, tar_runs = itertools.count(), itertools.count()

        def ours_write():
            write_ours(root / f"ours_{next(ours_runs)}", samples, args.per_shard)

        def tar_write():
            write_tarfile(root / f"tar_{next(tar_runs)}", samples, args.per_shard)

        t_write_tar = t_write_ours = float("inf")
        for _ in range(args.repeats):  # alternate so drift on a noisy machine hits both sides
            t_write_tar = min(t_write_tar, best_of(tar_write, 1))
            t_write_ours = min(t_write_ours, best_of(ours_write, 1))
        build_dir = root / "ours_0"
        tars = sorted(build_dir.glob("*.tar"))
        t_read_tar = t_read_raw = t_read_valid = float("inf")
        for _ in range(args.repeats):
            t_read_tar = min(t_read_tar, best_of(lambda: read_tarfile(tars), 1))
            t_read_raw = min(t_read_raw, best_of(lambda: sum(1 for _ in iter_samples(build_dir)), 1))
            t_read_valid = min(t_read_valid, best_of(lambda: sum(1 for _ in iter_records(build_dir)), 1))
        n = args.samples
        print(f"samples={n} shard_bytes={sum(p.stat().st_size for p in tars)}")
        print(f"write: tarfile {n / t_write_tar:.0f}/s  ShardWriter {n / t_write_ours:.0f}/s")
        print(f"read:  tarfile {n / t_read_tar:.0f}/s  iter_samples {n / t_read_raw:.0f}/s  "
              f"iter_records (validated) {n / t_read_valid:.0f}/s")
        print(f"reader_ratio={t_read_tar / t_read_raw:.2f} validated_reader_ratio={t_read_tar / t_read_valid:.2f} "
              f"writer_ratio={t_write_tar / t_write_ours:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
