"""A stage failing on most of a shard trips the breaker (shard unfinished, nothing committed); error rows of an
infrastructure kind are rebuilt by ``retry_errors`` with every input still written exactly once."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_schemas import ImageLimits, Tag
from data_schemas.config import BreakerConfig
from pipeline.breaker import ShardTripped, check_breaker, is_infrastructure_error, stage_failures
from pipeline.shard_build import build_shards
from pipeline.shards import finished_shards, iter_samples, read_shard_rows
from pipeline.sources.folder import FolderSource
from pipeline.stages import Chain, TagStage
from pipeline.validate import validate_build

WIDTHS = list(range(30, 40))  # ten images, two shards of five


class FlakyTagger:
    """Raises a CUDA-like error on images whose width is in ``broken``."""

    kind, name, version = "tagger", "flaky", "1"

    def __init__(self, broken) -> None:
        self.broken = set(broken)

    def load(self) -> None:
        pass

    def __call__(self, images):
        if any(image.width in self.broken for image in images):
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
        return [[Tag(name=f"w{image.width}", score=0.9, annotator=self.name)] for image in images]


def _folder(root: Path) -> FolderSource:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, width in enumerate(WIDTHS):
        Image.fromarray(rng.integers(0, 255, size=(20, width, 3), dtype=np.uint8)).save(root / f"img_{i:02d}.png")
    (root / "zz_text.jpg").write_text("not an image")  # a bad input: an error row no retry can fix
    return FolderSource(root)


def _rows(build_dir: Path) -> list[dict]:
    return [row for name in finished_shards(build_dir) for row in read_shard_rows(build_dir, name)]


def test_error_kinds_and_stage_counts():
    errors = ["annotator_failed: tagger: RuntimeError: CUDA error", None, "annotator_output: tagger: KeyError: 3",
              "annotator_failed: detector_bigdet: ValueError: x", "not_an_image: cannot identify"]
    assert stage_failures(errors) == Counter({"tagger": 2, "detector_bigdet": 1})
    assert [is_infrastructure_error(e) for e in errors] == [True, False, True, True, False]
    assert is_infrastructure_error("internal: OSError: stale file handle")
    check_breaker("00000", errors, BreakerConfig(max_stage_failure=0.5, min_inputs=4))  # 2 of 5: fine
    with pytest.raises(ShardTripped, match=r"shard 00000: stage tagger failed on 2 of 5 inputs .*First: annotator_"):
        check_breaker("00000", errors, BreakerConfig(max_stage_failure=0.3, min_inputs=4))
    check_breaker("00000", errors, BreakerConfig(max_stage_failure=0.3, min_inputs=6))  # too few to judge


class BrokenTagger(FlakyTagger):
    """A sticky device error: fails on every image, the breaker's control image included."""

    def __init__(self) -> None:
        super().__init__(())

    def __call__(self, images):
        raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")


def test_systematic_failure_trips_the_breaker_and_commits_nothing(tmp_path):
    source = _folder(tmp_path / "in")
    chain = Chain([TagStage("tagger", BrokenTagger())])
    breaker = BreakerConfig(max_stage_failure=0.5, min_inputs=4)
    with pytest.raises(ShardTripped, match=r"shard 00000: stage tagger failed on 5 of 5 inputs .*control image failed"):
        build_shards(source, tmp_path / "out", 5, ImageLimits(), annotate=chain, breaker=breaker)
    assert finished_shards(tmp_path / "out") == [] and not list((tmp_path / "out").glob("*.tmp"))
    # without a breaker (the old behaviour) the shard is committed full of error rows and resume skips it
    build_shards(source, tmp_path / "old", 5, ImageLimits(), annotate=chain)
    assert sum(row["status"] == "error" for row in _rows(tmp_path / "old")) == 11


def test_inputs_failing_on_their_own_are_error_rows_not_a_trip(tmp_path):
    """Issue 20 class 1: most of a small shard failing in a stage for reasons of its own (here every input image
    fails the tagger; an ordinary image passes) is no systematic failure: the shard is committed, one error row
    per failed input, instead of failing whole and losing its good images."""
    source = _folder(tmp_path / "in")
    tagger = FlakyTagger(WIDTHS[:4] + WIDTHS[5:9])  # 4 of each 5 fail; img_04 and img_09 are fine
    breaker = BreakerConfig(max_stage_failure=0.5, min_inputs=4)
    summary = build_shards(source, tmp_path / "out", 5, ImageLimits(), annotate=Chain([TagStage("tagger", tagger)]),
                           breaker=breaker)
    assert len(summary.written) == 3
    rows = _rows(tmp_path / "out")
    assert sorted(row["source_id"] for row in rows if row["status"] == "ok") == ["img_04.png", "img_09.png"]
    failed = [row for row in rows if row["error"] and row["error"].startswith("annotator_failed: tagger")]
    assert len(failed) == 8


def test_retry_errors_rebuilds_infrastructure_error_rows_exactly_once(tmp_path):
    source = _folder(tmp_path / "in")
    out = tmp_path / "out"
    tagger = FlakyTagger({WIDTHS[1], WIDTHS[7]})  # one image in each shard fails: under the breaker
    chain = Chain([TagStage("tagger", tagger)])
    breaker = BreakerConfig(max_stage_failure=0.5, min_inputs=4)
    first = build_shards(source, out, 5, ImageLimits(), annotate=chain, breaker=breaker)
    assert len(first.written) == 3
    errors = {row["source_id"]: row["error"] for row in _rows(out) if row["status"] == "error"}
    assert sorted(errors) == ["img_01.png", "img_07.png", "zz_text.jpg"]
    copied_before = {s.key: s.members for s in iter_samples(out)}

    plain_rerun = build_shards(source, out, 5, ImageLimits(), annotate=chain, breaker=breaker)
    assert plain_rerun.written == [] and plain_rerun.repaired == []  # resume alone never touches them

    tagger.broken.clear()  # the fault is fixed
    repaired = build_shards(source, out, 5, ImageLimits(), annotate=chain, breaker=breaker, retry_errors=True)
    assert sorted(s.shard for s in repaired.repaired) == ["00000", "00001"]
    rows = _rows(out)
    assert Counter(row["source_id"] for row in rows) == Counter(source.list_refs())  # every input once
    assert [row["source_id"] for row in rows if row["status"] == "error"] == ["zz_text.jpg"]
    samples = {s.key: s.members for s in iter_samples(out)}
    assert len(samples) == 10 and all(copied_before[k] == v for k, v in copied_before.items())  # carried as is
    assert validate_build(out).ok
    again = build_shards(source, out, 5, ImageLimits(), annotate=chain, breaker=breaker, retry_errors=True)
    assert again.repaired == []  # nothing retryable is left
