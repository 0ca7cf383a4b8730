"""`umg build` with the oracle backends on digit scenes: without noise the shards hold the ground truth; with
configs/annotation_noise.yaml the build is reproducible and the paper's filters remove what they should."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from annotators.oracle import fill_truth
from flows.cli import app
from pipeline.masks import decode_mask
from pipeline.sample_data import generate_sample
from pipeline.shards import iter_records

NOISE = Path(__file__).resolve().parents[2] / "configs" / "annotation_noise.yaml"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle_build")
    generate_sample(root, n=16, seed=5)
    return root


def _build(scenes: Path, out: Path, annotate: dict, *overrides: str) -> list:
    truth = fill_truth(annotate, scenes / "annotations" / "instances_train.json", scenes / "images" / "train",
                       scenes / "annotations" / "captions_train.json")
    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump({"build": {"shard_size": 8, "annotate": truth}}))
    result = CliRunner().invoke(app, ["build", "--config", str(config), "--input", str(scenes / "images" / "train"),
                                      "--output", str(out), "--source-kind", "folder", *overrides])
    assert result.exit_code == 0, result.output
    return sorted((record for record, _ in iter_records(out)), key=lambda r: r.source_id)


def _truth(scenes: Path) -> dict:
    """file name -> ground-truth record, from `umg build` of the COCO annotations themselves."""
    from data_schemas import ImageLimits, SourceConfig
    from pipeline.shard_build import build_shards
    from pipeline.sources.registry import build_source

    out = scenes.parent / f"{scenes.name}_gt"
    if not out.exists():
        source = build_source(SourceConfig(kind="coco", annotations=scenes / "annotations" / "instances_train.json",
                                           captions=scenes / "annotations" / "captions_train.json",
                                           image_dir=scenes / "images" / "train"))
        build_shards(source, out, 64, ImageLimits())
    return {Path(r.source_id).name: r for r, _ in iter_records(out)}


def test_zero_noise_build_holds_the_ground_truth(scenes, tmp_path):
    clean = {"keep_known": False, "tagger": {"backend": "oracle"}, "captioners": {"gt": {"backend": "oracle"}},
             "detectors": {"gt": {"backend": "oracle"}}, "region_captioners": {"gt": {"backend": "oracle"}},
             "segmenter": {"backend": "oracle"},
             # one label per digit: class-aware NMS keeps two overlapping digits of different classes
             "merge": {"class_aware": True, "iou_threshold": 0.9},
             # a jittered box may cover a neighbouring digit better than its own: keep every mask here
             "stability": {"threshold": 0.0}}
    truth = _truth(scenes)
    records = _build(scenes, tmp_path / "clean", clean)
    assert len(records) == len(truth) >= 10
    n_regions = stable = 0
    for record in records:
        gt = truth[Path(record.source_id).name]
        assert [c.text for c in record.captions] == [c.text for c in gt.captions]
        assert all(c.kept for c in record.captions)
        assert {t.name for t in record.tags} == {t.name for t in gt.tags}
        assert len(record.regions) == len(gt.regions)
        order = np.lexsort(np.array([r.box_xyxy for r in record.regions]).T[::-1])
        gt_order = np.lexsort(np.array([r.box_xyxy for r in gt.regions]).T[::-1])
        for region, gt_region in zip((record.regions[i] for i in order), (gt.regions[i] for i in gt_order)):
            np.testing.assert_allclose(region.box_xyxy, gt_region.box_xyxy, atol=1e-3)
            assert region.label == gt_region.label
            assert [c.text for c in region.captions] == [c.text for c in gt_region.captions]
            stable += region.mask.stability == 1.0
            assert (decode_mask(region.mask.rle) == decode_mask(gt_region.mask.rle)).all()
            n_regions += 1
    assert n_regions >= 12 and stable >= 0.8 * n_regions


def test_noisy_build_is_reproducible_and_the_filters_remove_noise(scenes, tmp_path):
    noise = yaml.safe_load(NOISE.read_text())
    annotate = noise["build"]["annotate"]
    first = _build(scenes, tmp_path / "a", annotate)
    again = _build(scenes, tmp_path / "b", annotate)
    assert [r.model_dump(exclude={"key"}) for r in first] == [r.model_dump(exclude={"key"}) for r in again]
    off = _build(scenes, tmp_path / "off", annotate, *(f"--set={o}" for o in noise["filters_off"]))
    n_on, n_off = (sum(len(r.regions) for r in rs) for rs in (first, off))
    masks_on, masks_off = (sum(reg.mask is not None for r in rs for reg in r.regions) for rs in (first, off))
    assert n_on < n_off and masks_on < n_on and masks_off == n_off
    assert min(reg.score for r in first for reg in r.regions) >= 0.3
    assert min(reg.score for r in off for reg in r.regions) < 0.3
