"""The stage chain with small protocol-conforming test annotators (no models): order, provenance,
merge, jitter stability, batch splitting on failure. Real tiny backends run in test_build_chain.py."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from annotators import DetectorOutput, SegmentOutput, StuffSegment
from data_schemas import AnnotateConfig, Caption, ImageLimits, RegionCaption, Tag
from pipeline.ingest import ingest_item
from pipeline.sources.base import SourceItem
from pipeline.stages import (
    CaptionStage,
    Chain,
    DetectStage,
    MergeStage,
    ScoreStage,
    SegmentStage,
    StabilityStage,
    TagStage,
    run_stage,
)
from pipeline.masks import decode_mask


def _png(width: int, height: int) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _items(sizes=((64, 48), (100, 100), (37, 81))):
    return [
        ingest_item(SourceItem(f"img-{i}", f"img-{i}.png", _png(w, h)), "test", ImageLimits())
        for i, (w, h) in enumerate(sizes)
    ]


class Backend:
    """Counts calls; ``fail_on`` makes a call fail when it contains that image width."""

    name = "test"
    version = "1"

    def __init__(self, fn, fail_on=None):
        self.fn, self.fail_on, self.calls, self.loads = fn, fail_on, [], 0

    def load(self):
        self.loads += 1

    def __call__(self, images, *rest):
        self.calls.append(len(images))
        if self.fail_on is not None and any(im.width == self.fail_on for im in images):
            raise RuntimeError("CUDA out of memory (simulated)")
        return [self.fn(im, *args) for im, *args in zip(images, *rest)]


def _rect_masks(image, boxes):
    masks = np.zeros((len(boxes), image.height, image.width), dtype=bool)
    for mask, (x1, y1, x2, y2) in zip(masks, np.round(boxes).astype(int)):
        mask[y1:y2, x1:x2] = True
    return SegmentOutput(masks=masks, scores=np.ones(len(boxes), np.float32))


OBJECT = (10, 10, 60, 60)


def _object_or_rect_masks(image, boxes):
    """Like SAM on an image with one object at OBJECT: a box near it gives the object, else the box."""
    out = _rect_masks(image, boxes)
    x1, y1, x2, y2 = OBJECT
    for mask, box in zip(out.masks, boxes):
        if abs(box[0] - x1) <= 10 and abs(box[1] - y1) <= 10:
            mask[:] = False
            mask[y1:y2, x1:x2] = True
    return out


def test_failing_batch_is_split_and_only_the_bad_image_errors():
    items = _items()
    tagger = Backend(lambda im: [Tag(name="grass", score=0.9, annotator="test")], fail_on=100)
    run_stage(TagStage("tagger", tagger), items)
    assert tagger.calls == [3, 1, 2, 1, 1]  # whole batch, then halves [1] + [2] -> [1] + [1]
    assert [it.error is None for it in items] == [True, False, True]
    assert items[1].error.startswith("annotator_failed: tagger: RuntimeError: CUDA out of memory")
    assert [len(it.record.tags) for it in items] == [1, 0, 1]
    assert items[0].record.provenance["tagger"] == "test@1"
    # A failed image is skipped by later stages.
    captioner = Backend(lambda im: [Caption(text="x", annotator="test")])
    run_stage(CaptionStage("captioner_a", captioner), items)
    assert captioner.calls == [2]


def test_scores_mark_captions_kept_by_threshold():
    items = _items(((40, 30),))
    items[0].record.captions = [Caption(text="good", annotator="a"), Caption(text="bad", annotator="a")]
    scorer = Backend(lambda im, texts: np.array([0.3 if t == "good" else 0.1 for t in texts]))
    run_stage(ScoreStage("scorer", scorer, threshold=0.2), items)
    assert [(c.text, c.clip_score, c.kept) for c in items[0].record.captions] == [
        ("good", 0.3, True), ("bad", 0.1, False)]


def test_two_detectors_merge_into_regions_with_provenance():
    items = _items(((100, 100),))
    a = Backend(lambda im: DetectorOutput([[10, 10, 50, 50], [0, 0, 5, 5]], [0.9, 0.2], ["cat", "dog"]))
    b = Backend(lambda im: DetectorOutput([[12, 11, 50, 52], [60, 60, 140, 90]], [0.8, 0.5], ["cat", "cat"]))
    for stage in (DetectStage("detector_a", a, source="a"), DetectStage("detector_b", b, source="b"),
                  MergeStage("merge")):
        run_stage(stage, items)
    regions = items[0].record.regions
    # dog 0.2 < 0.3 dropped; b's first cat overlaps a's (IoU > 0.5) and is suppressed; last box clipped to 100.
    assert [(r.id, r.label, r.annotator, r.box_xyxy) for r in regions] == [
        (0, "cat", "detector_a", (10.0, 10.0, 50.0, 50.0)),
        (1, "cat", "detector_b", (60.0, 60.0, 100.0, 90.0)),
    ]
    assert "detections" not in items[0].scratch
    assert set(items[0].record.provenance) == {"detector_a", "detector_b", "merge"}


def test_segment_then_jitter_keeps_stable_masks_only():
    items = _items(((100, 100),))
    det = Backend(lambda im: DetectorOutput([[10, 10, 60, 60], [70, 70, 74, 74]], [0.9, 0.9], ["a", "b"]))
    seg = Backend(_object_or_rect_masks)
    stages = [DetectStage("detector_x", det, source="x"), MergeStage("merge"), SegmentStage("segmenter", seg),
              StabilityStage("stability", seg)]
    for stage in stages:
        run_stage(stage, items)
    big, small = items[0].record.regions
    # The object's mask does not move with a jittered box; the 4 px box hits no object and its mask does.
    assert big.mask is not None and big.mask.stability > 0.8
    assert small.mask is None
    assert decode_mask(big.mask.rle)[10:60, 10:60].all()
    assert seg.calls == [1, 1]  # one call for all boxes, one call for all jittered boxes


def test_chain_from_config_loads_each_backend_once(monkeypatch):
    built = {}

    def fake_build(kind, cfg):
        built.setdefault(cfg["backend"], Backend(lambda im, *a: _rect_masks(im, a[0]) if a else []))
        return built[cfg["backend"]]

    monkeypatch.setattr("annotators.build", fake_build)
    cfg = AnnotateConfig(segmenter={"backend": "seg"}, background={"backend": "bg"})
    chain = Chain.from_config(cfg)
    assert [s.name for s in chain.stages] == ["segmenter", "stability", "background"]
    chain.load()
    assert built["seg"].loads == 1 and built["bg"].loads == 1


def test_region_output_count_mismatch_is_an_error_row():
    from pipeline.stages import RegionCaptionStage

    items = _items(((100, 100),))
    det = Backend(lambda im: DetectorOutput([[10, 10, 60, 60]], [0.9], ["a"]))
    for stage in (DetectStage("detector_x", det, source="x"), MergeStage("merge")):
        run_stage(stage, items)
    wrong = Backend(lambda im, boxes: [[RegionCaption(text="a", annotator="t")]] * (len(boxes) + 1))
    run_stage(RegionCaptionStage("region_captioner_x", wrong), items)
    assert items[0].error.startswith("annotator_output: region_captioner_x: ValueError: 2 caption lists for 1")


@pytest.mark.parametrize("keep_known", [True, False])
def test_keep_known_controls_ground_truth(keep_known):
    items = _items(((40, 30),))
    items[0].record.tags = [Tag(name="gt", annotator="ground_truth")]
    Chain([], keep_known=keep_known)(items)
    assert len(items[0].record.tags) == (1 if keep_known else 0)


def test_background_segments_become_rle():
    from pipeline.stages import BackgroundStage

    items = _items(((64, 48),))
    full = np.ones((48, 64), dtype=bool)
    bg = Backend(lambda im: [StuffSegment(label="sky", mask=full, score=0.7)])
    run_stage(BackgroundStage("background", bg), items)
    (segment,) = items[0].record.background
    assert (segment.label, segment.score, segment.annotator) == ("sky", 0.7, "background_test")
    assert decode_mask(segment.rle).all()


def test_lost_worker_is_not_turned_into_error_rows():
    from annotators import WorkerLost

    class Dying(Backend):
        def __call__(self, images, *rest):
            raise WorkerLost("actor died")

    items = _items()
    with pytest.raises(WorkerLost):
        run_stage(TagStage("tagger", Dying(None)), items)
    assert all(item.error is None for item in items)
