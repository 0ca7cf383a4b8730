"""What a build's annotations are worth against the ground truth (experiments/annotation_noise.py).

``audit_build(build_dir, truth_dir)`` compares every record of a build (``umg build`` with the oracle) with the
ground-truth record of the same image (the clean sample shards, matched by file name) and counts:

- captions: all / kept (what training reads: ``kept_captions_only``), and how many of each are true (the text is
  one of the image's ground-truth captions);
- regions: how many; *right* = IoU >= 0.5 with a true box and the true label; *duplicate* = a second region on an
  already-matched true box; *spurious* = IoU < 0.5 with every true box; recall of the true boxes; region captions
  that are true (one of the matched true region's captions);
- masks: how many, and their mean IoU with the matched true mask (unmatched regions count as IoU 0);
- image tags: how many, how many true.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from annotators.oracle_truth import box_ious, mask_ious
from pipeline.masks import decode_mask
from pipeline.shards import iter_records

MATCH_IOU = 0.5


def _by_name(build_dir: Path) -> dict:
    return {Path(record.source_id).name: record for record, _ in iter_records(build_dir)}


def audit_record(record, truth, counts: Counter) -> None:
    """Add one record's counts (see the module docstring) to ``counts``."""
    true_captions = {c.text for c in truth.captions}
    for caption in record.captions:
        counts["captions"] += 1
        counts["captions_true"] += caption.text in true_captions
        counts["captions_kept"] += caption.kept
        counts["captions_kept_true"] += caption.kept and caption.text in true_captions
    true_tags = {t.name for t in truth.tags}
    counts["tags"] += len(record.tags)
    counts["tags_true"] += sum(t.name in true_tags for t in record.tags)
    true_boxes = np.array([r.box_xyxy for r in truth.regions], np.float32).reshape(-1, 4)
    boxes = np.array([r.box_xyxy for r in record.regions], np.float32).reshape(-1, 4)
    ious = box_ious(boxes, true_boxes)
    counts["true_regions"] += len(true_boxes)
    matched: set[int] = set()
    for region, row in zip(record.regions, ious):
        counts["regions"] += 1
        best = int(row.argmax()) if row.size else -1
        hit = best >= 0 and row[best] >= MATCH_IOU
        true_region = truth.regions[best] if hit else None
        counts["regions_spurious"] += not hit
        counts["regions_duplicate"] += hit and best in matched
        counts["regions_right"] += hit and best not in matched and region.label == true_region.label
        if hit:
            matched.add(best)
        truth_texts = {c.text for c in true_region.captions} if hit else set()
        counts["region_captions"] += len(region.captions)
        counts["region_captions_true"] += sum(c.text in truth_texts for c in region.captions)
        if region.mask is not None:
            counts["masks"] += 1
            if hit and true_region.mask is not None:
                mask = decode_mask(region.mask.rle)
                counts["mask_iou_sum"] += float(mask_ious(mask, decode_mask(true_region.mask.rle)[None])[0])
    counts["true_regions_found"] += len(matched)


def audit_build(build_dir: str | Path, truth_dir: str | Path) -> dict[str, float]:
    """Counts and rates of one build against the ground truth (module docstring); plain JSON numbers."""
    truth = _by_name(Path(truth_dir))
    counts: Counter = Counter()
    for name, record in _by_name(Path(build_dir)).items():
        if name not in truth:
            raise ValueError(f"{build_dir}: image {name} has no ground-truth record in {truth_dir}")
        counts["images"] += 1
        audit_record(record, truth[name], counts)
    out = {key: (round(value, 2) if isinstance(value, float) else int(value)) for key, value in counts.items()}

    def rate(num: str, den: str) -> float | None:
        return round(counts[num] / counts[den], 4) if counts[den] else None

    out.update({
        "caption_precision_all": rate("captions_true", "captions"),
        "caption_precision_kept": rate("captions_kept_true", "captions_kept"),
        "region_precision": rate("regions_right", "regions"),
        "region_recall": rate("true_regions_found", "true_regions"),
        "region_caption_precision": rate("region_captions_true", "region_captions"),
        "tag_precision": rate("tags_true", "tags"),
        "mask_mean_iou": rate("mask_iou_sum", "masks"),
    })
    return out


def filter_removals(off: dict, on: dict) -> dict[str, int]:
    """What the filters removed, from the audits of the same build with filters off and on: captions (true /
    wrong), regions (right / wrong label / duplicate / spurious) and masks. Counts, ``off - on``."""
    def wrong_label(a: dict) -> int:
        return a["regions"] - a["regions_right"] - a["regions_spurious"] - a["regions_duplicate"]

    return {
        "captions_true": off["captions_kept_true"] - on["captions_kept_true"],
        "captions_wrong": (off["captions_kept"] - off["captions_kept_true"])
        - (on["captions_kept"] - on["captions_kept_true"]),
        "regions_right": off["regions_right"] - on["regions_right"],
        "regions_wrong_label": wrong_label(off) - wrong_label(on),
        "regions_duplicate": off["regions_duplicate"] - on["regions_duplicate"],
        "regions_spurious": off["regions_spurious"] - on["regions_spurious"],
        "masks": off["masks"] - on["masks"],
    }
