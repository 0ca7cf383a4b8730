"""Check a build directory shard by shard: schema, manifest rows vs tar samples, stats, keys."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from data_schemas import COUNT_FIELDS, ShardStats
from pipeline.shards import (
    MANIFEST_NAME,
    finished_shards,
    iter_tar_samples,
    read_shard_rows,
    read_stats,
    shard_paths,
    stray_pieces,
    temp_files,
)
from pipeline.storage import StoragePath, as_path


@dataclass
class ValidationReport:
    """Totals over the good shards and one message per broken shard (``problems``)."""

    shards: int = 0
    inputs: int = 0
    samples: int = 0
    errors: int = 0
    regions: int = 0
    masks: int = 0
    captions: int = 0
    tags: int = 0
    background: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict:
        totals = {k: v for k, v in self.__dict__.items() if k != "problems"}
        return {**totals, "ok": self.ok, "problems": self.problems}


def _check_shard(build_dir: StoragePath, name: str, report: ValidationReport, keys: Counter) -> None:
    tar_path = shard_paths(build_dir, name)[".tar"]
    rows = read_shard_rows(build_dir, name)
    stats: ShardStats = read_stats(build_dir, name)
    ok_rows = {r["key"]: r for r in rows if r["status"] == "ok"}
    totals = Counter()
    seen = []
    for sample in iter_tar_samples(tar_path):
        seen.append(sample.key)
        record = sample.record()  # raises ValueError naming the field
        if record.key != sample.key:
            raise ValueError(f"sample {sample.key!r} holds record for {record.key!r}")
        if "jpg" not in sample.members:
            raise ValueError(f"sample {sample.key!r} has no jpg")
        row = ok_rows.get(sample.key)
        if row is None:
            raise ValueError(f"sample {sample.key!r} has no ok row in {name}.parquet")
        counts = record.counts()
        mismatched = [f for f in COUNT_FIELDS if row[f] != counts[f]]
        if mismatched:
            raise ValueError(f"sample {sample.key!r}: parquet counts {mismatched} differ from its record")
        totals.update(counts)
    if sorted(seen) != sorted(ok_rows):
        missing = sorted(set(ok_rows) - set(seen))[:5]
        raise ValueError(f"ok rows without samples in the tar: {missing} (and duplicates: {len(seen) != len(set(seen))})")
    if stats.n_inputs != len(rows) or stats.n_ok != len(ok_rows):
        raise ValueError(f"stats say {stats.n_inputs} inputs / {stats.n_ok} ok, parquet has {len(rows)} / {len(ok_rows)}")
    keys.update(seen)
    report.shards += 1
    report.inputs += len(rows)
    report.samples += len(seen)
    report.errors += len(rows) - len(ok_rows)
    report.regions += totals["n_regions"]
    report.masks += totals["n_masks"]
    report.captions += totals["n_captions"]
    report.tags += totals["n_tags"]
    report.background += totals["n_background"]


def validate_build(build_dir: str | Path | StoragePath) -> ValidationReport:
    """Validate every shard of ``build_dir`` (a folder or URL); problems name the shard (or file) and what is wrong."""
    build_dir = as_path(build_dir)
    report = ValidationReport()
    if not build_dir.is_dir():
        report.problems.append(f"{build_dir}: not a directory")
        return report
    names = finished_shards(build_dir)
    stray = [p.name for p in stray_pieces(build_dir)]
    if stray:
        report.problems.append(f"incomplete shard files (no tar+parquet+stats set): {stray}")
    temps = sorted(p.name for p in temp_files(build_dir))
    if temps:
        report.problems.append(f"unfinished temp files (a writer was interrupted; rerun the build): {temps}")
    if not names:
        report.problems.append(f"{build_dir}: no finished shards")
    if names and not (build_dir / MANIFEST_NAME).exists():
        report.problems.append(f"{build_dir}: {MANIFEST_NAME} missing")
    keys: Counter = Counter()
    for name in names:
        try:
            _check_shard(build_dir, name, report, keys)
        except Exception as exc:  # noqa: BLE001 - any failure means this shard is broken
            report.problems.append(f"shard {name}: {type(exc).__name__}: {exc}")
    duplicates = sorted(k for k, n in keys.items() if n > 1)
    if duplicates:
        report.problems.append(f"keys in more than one sample: {duplicates[:10]}")
    return report
