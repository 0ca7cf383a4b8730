"""Ground-truth shards of the digit-scenes sample data (training can start before annotators exist)."""

from __future__ import annotations

from pathlib import Path

from data_schemas import ImageLimits, SourceConfig
from pipeline.sample_data import SampleConfig, generate_sample
from pipeline.shard_build import build_shards
from pipeline.sources.registry import build_source

SPLITS = ("train", "val", "test")


def write_sample_shards(out_dir: str | Path, n: int, seed: int, shard_size: int = 64,
                        config: SampleConfig | None = None) -> dict:
    """Generate ``n`` scenes (``config``, default ``SampleConfig()``) under ``out_dir/raw`` and write them as
    shards to ``out_dir/<split>``.

    Returns ``{split: {"build_dir", "inputs", "ok", "errors"}}`` for the splits that have images.
    """
    out_dir = Path(out_dir)
    raw = out_dir / "raw"
    generate_sample(raw, n=n, seed=seed, config=config)
    summary = {}
    for split in SPLITS:
        instances = raw / "annotations" / f"instances_{split}.json"
        if not instances.exists():
            continue
        source = build_source(
            SourceConfig(
                kind="coco",
                path=raw,
                annotations=instances,
                captions=raw / "annotations" / f"captions_{split}.json",
                image_dir=raw / "images" / split,
            )
        )
        result = build_shards(source, out_dir / split, shard_size, ImageLimits())
        summary[split] = {
            "build_dir": str(out_dir / split),
            "inputs": result.n_inputs,
            "ok": sum(s.n_ok for s in result.written),
            "errors": sum(s.n_error for s in result.written),
        }
    return summary
