"""The stage chain with small protocol-conforming test annotators (no models): order, provenance,
merge, jitter stability, batch splitting on failure. Real tiny backends run in test_build_chain.py."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from annotators import DetectorOutput, SegmentOutput, StuffSegment
from data_schemas import AnnotateConfig, Caption, ImageLimits, MergeConfig, Region, RegionCaption, StabilityConfig, Tag
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
from pipeline.filters import jittered_mask_stability
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


def _object_or_rect_masks(image, boxes, jittered=None):
    """Like SAM on an image with one object at OBJECT: a box centred on it gives the object, else the box.
    With ``jittered`` boxes ``(N, K, 4)`` also each mask's stability, as the SAM backend returns it."""
    out = _rect_masks(image, boxes)
    x1, y1, x2, y2 = OBJECT
    for mask, box in zip(out.masks, boxes):
        if x1 < (box[0] + box[2]) / 2 < x2 and y1 < (box[1] + box[3]) / 2 < y2:
            mask[:] = False
            mask[y1:y2, x1:x2] = True
    if jittered is not None:
        out.stability = jittered_mask_stability(image, out.masks, jittered,
                                                lambda im, b: _object_or_rect_masks(im, b).masks)
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


def test_paper_config_merges_two_vocabularies_once_per_object():
    from pathlib import Path

    from data_schemas import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "umg41m.yaml").annotate.merge
    assert cfg.class_aware is False
    items = _items(((100, 100),))
    bigdet = Backend(lambda im: DetectorOutput([[10, 10, 50, 50]], [0.9], ["car"]))
    v3det = Backend(lambda im: DetectorOutput([[11, 10, 50, 52], [12, 12, 49, 50]], [0.8, 0.7],
                                              ["automobile", "motor_car"]))
    for stage in (DetectStage("detector_bigdet", bigdet, source="bigdet"),
                  DetectStage("detector_v3det", v3det, source="v3det"), MergeStage("merge", config=cfg)):
        run_stage(stage, items)
    assert [(r.label, r.annotator) for r in items[0].record.regions] == [("car", "detector_bigdet")]
    assert items[0].record.provenance["merge"] == "nms@iou0.5_score0.3_agnostic"


def test_label_map_file_for_class_aware_merge(tmp_path):
    table = tmp_path / "synonyms.yaml"
    table.write_text("automobile: car\nmotor car: car\n")
    items = _items(((100, 100),))
    a = Backend(lambda im: DetectorOutput([[10, 10, 50, 50], [12, 10, 50, 50]], [0.9, 0.8], ["car", "Motor_Car"]))
    b = Backend(lambda im: DetectorOutput([[11, 10, 50, 52]], [0.85], ["automobile"]))
    merge = MergeStage("merge", config=MergeConfig(class_aware=True, label_map=table))
    for stage in (DetectStage("detector_a", a, source="a"), DetectStage("detector_b", b, source="b"), merge):
        run_stage(stage, items)
    assert [r.label for r in items[0].record.regions] == ["car"]
    table.write_text("- not a mapping\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        MergeStage("merge", config=MergeConfig(label_map=table))


def test_segment_then_jitter_keeps_stable_masks_only():
    items = _items(((100, 100),))
    det = Backend(lambda im: DetectorOutput([[10, 10, 60, 60], [70, 70, 74, 74]], [0.9, 0.9], ["a", "b"]))
    seg = Backend(_object_or_rect_masks)
    config = StabilityConfig(diagonal_fractions=[0.1, 0.25], threshold=0.8)
    stages = [DetectStage("detector_x", det, source="x"), MergeStage("merge"),
              SegmentStage("segmenter", seg, stability=config), StabilityStage("stability", config=config)]
    for stage in stages:
        run_stage(stage, items)
    big, small = items[0].record.regions
    # The object's mask does not move with a jittered box; the 4 px box hits no object and its mask moves
    # with the box: 1 px at 0.25 of its diagonal (the 0.4 px shift rounds away): (1 + 9/23) / 2 < 0.8.
    assert big.mask is not None and big.mask.stability == 1.0
    assert small.mask is None
    assert decode_mask(big.mask.rle)[10:60, 10:60].all()
    assert seg.calls == [1]  # one segmenter call for the boxes and their jittered copies: one image encoding
    assert items[0].record.provenance["stability"] == "jitter@diag[0.1, 0.25]_thr0.8"


def test_segment_stage_passes_each_box_jittered_along_its_diagonal():
    items = _items(((100, 100),))
    items[0].record.regions = [Region(id=0, box_xyxy=(10, 10, 30, 50), label="a", annotator="t")]
    seen = []

    def segment(image, boxes, jittered):
        seen.append(jittered)
        return _object_or_rect_masks(image, boxes, jittered)

    config = StabilityConfig(diagonal_fractions=[0.1], threshold=0.0)
    run_stage(SegmentStage("segmenter", Backend(segment), stability=config), items)
    np.testing.assert_array_equal(seen[0], [[[12, 14, 32, 54], [8, 6, 28, 46]]])  # +-0.1 x (20, 40)
    assert items[0].error is None and items[0].scratch["segmented"][1].shape == (1,)


def test_segmenter_without_stability_output_is_an_error_row():
    items = _items(((100, 100),))
    items[0].record.regions = [Region(id=0, box_xyxy=(10, 10, 30, 50), label="a", annotator="t")]
    seg = Backend(lambda im, boxes, jittered: _rect_masks(im, boxes))
    run_stage(SegmentStage("segmenter", seg, stability=StabilityConfig()), items)
    assert "segmenter returned no stability" in items[0].error


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


def test_batches_in_flight_encode_each_image_once(tmp_path, monkeypatch):
    """Masks and jitter stability come from one segmenter call, so no embedding cache has to survive between
    two calls while other batches pass through the same segmenter (``PipelinedChain``, Ray pools)."""
    import annotators
    from annotators.segmenter import SamSegmenter
    from pipeline.chain_runner import PipelinedChain

    sam = annotators.build("segmenter", SamSegmenter.create_tiny(tmp_path) | {"embedding_cache": 0})
    sam.load()
    encodings = []
    encode = sam.predictor.model.image_encoder.forward
    monkeypatch.setattr(sam.predictor.model.image_encoder, "forward", lambda x: encodings.extend([1] * len(x)) or encode(x))  # images, not calls: SAM encodes in batches
    items = _items([(64 + i, 48) for i in range(6)])
    for item in items:
        item.record.regions = [Region(id=0, box_xyxy=(4, 4, 40, 30), label="a", annotator="t"),
                               Region(id=1, box_xyxy=(30, 10, 60, 44), label="b", annotator="t")]
    config = StabilityConfig(threshold=0.0)
    chain = Chain([SegmentStage("segmenter", sam, stability=config), StabilityStage("stability", config=config)])
    PipelinedChain(chain, batch_size=2, max_in_flight=3).run(items)
    assert len(encodings) == 6
    assert all(item.error is None for item in items)
    assert all(r.mask is not None and 0.0 <= r.mask.stability <= 1.0 for it in items for r in it.record.regions)


def test_captions_are_deduplicated_across_captioners():
    items = _items(((40, 30),))
    blip2 = Backend(lambda im: [Caption(text="A dog on a beach.", annotator="blip2", prompt="a photo of"),
                                Caption(text="a brown dog", annotator="blip2")])
    vlm = Backend(lambda im: [Caption(text="a dog on a beach", annotator="vlm", prompt="Describe it."),
                              Caption(text="A DOG, on the beach", annotator="vlm"),
                              Caption(text="a brown dog!", annotator="vlm")])
    run_stage(CaptionStage("captioner_blip2", blip2), items)
    run_stage(CaptionStage("captioner_vlm", vlm), items)
    assert [(c.text, c.annotator, c.prompt) for c in items[0].record.captions] == [
        ("A dog on a beach.", "blip2", "a photo of"), ("a brown dog", "blip2", None),
        ("A DOG, on the beach", "vlm", None)]


def test_region_captions_deduplicated_and_regions_under_the_minimum_dropped():
    from pipeline.stages import RegionCaptionCountStage, RegionCaptionStage

    items = _items(((100, 100),))
    known = Region(id=0, box_xyxy=(1, 1, 9, 9), label="gt", annotator="ground_truth")
    det = Backend(lambda im: DetectorOutput([[10, 10, 60, 60], [70, 70, 90, 90]], [0.9, 0.8], ["a", "b"]))
    first = Backend(lambda im, boxes: [[RegionCaption(text=f"thing {i}", annotator="x", prompt="p")] +
                                       [RegionCaption(text=f"Object {j}.", annotator="x") for j in range(2)]
                                       for i in range(len(boxes))])
    # the second captioner repeats the first's texts for every box but adds a new one only for box 1 (id 1)
    second = Backend(lambda im, boxes: [[RegionCaption(text="object 0", annotator="y")] +
                                        ([RegionCaption(text="a red thing", annotator="y")] if i == 1 else [])
                                        for i in range(len(boxes))])
    items[0].record.regions = [known]
    for stage in (DetectStage("detector_d", det, source="d"), MergeStage("merge"),
                  RegionCaptionStage("region_captioner_x", first), RegionCaptionStage("region_captioner_y", second),
                  RegionCaptionCountStage("region_caption_count", min_captions=4)):
        run_stage(stage, items)
    regions = items[0].record.regions
    assert [r.id for r in regions] == [0, 1]  # ground truth kept; region 2 had 3 distinct captions and is dropped
    assert [c.text for c in regions[1].captions] == ["thing 1", "Object 0.", "Object 1.", "a red thing"]


def test_min_region_captions_from_config_adds_the_count_stage(monkeypatch):
    monkeypatch.setattr("annotators.build", lambda kind, cfg: Backend(lambda im, *a: []))
    cfg = AnnotateConfig(detectors={"d": {"backend": "x"}}, region_captioners={"r": {"backend": "y"}},
                         min_region_captions=4)
    names = [s.name for s in Chain.from_config(cfg).stages]
    assert names == ["detector_d", "merge", "region_captioner_r", "region_caption_count"]
