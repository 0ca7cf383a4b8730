"""COCO export of a shard build: pycocotools loads it, boxes / masks / captions survive exactly."""

from __future__ import annotations

import json

import numpy as np
from pycocotools.coco import COCO

from data_schemas import BackgroundMask, Mask
from pipeline.export_coco import export_coco
from pipeline.masks import encode_mask
from pipeline.shards import ShardWriter


def _build(tmp_path, record_factory):
    mask = np.zeros((32, 48), dtype=bool)
    mask[2:30, 1:20] = True
    records = []
    for shard, keys in (("00000", ["a", "b"]), ("00001", ["c"])):
        with ShardWriter(tmp_path / "build", shard) as writer:
            for i, key in enumerate(keys):
                record, jpg = record_factory(key, n_regions=2, seed=i)
                record.regions[0] = record.regions[0].model_copy(
                    update={"mask": Mask(rle=encode_mask(mask), stability=0.93, annotator="sam"), "label": "seven"})
                record.background = [BackgroundMask(label="sky", rle=encode_mask(~mask), annotator="m2f")]
                writer.write(record, jpg)
                records.append(record)
            writer.write_error("bad", "bad.jpg", "empty: zero bytes")
            writer.commit()
    return tmp_path / "build", records, mask


def test_export_loads_in_pycocotools_with_masks_and_region_captions(tmp_path, record_factory):
    build_dir, records, mask = _build(tmp_path, record_factory)
    counts = export_coco(build_dir, tmp_path / "coco.json", images_dir=tmp_path / "images")
    assert counts == {"images": 3, "annotations": 6, "categories": 2, "background": 3, "masks": 3}

    coco = COCO(str(tmp_path / "coco.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["seven", "three"]
    first = coco.loadImgs(1)[0]
    assert (first["file_name"], first["width"], first["height"], first["umg_key"]) == ("a.jpg", 48, 32, "a")
    assert [c["text"] for c in first["umg_captions"]] == [c.text for c in records[0].captions]
    assert (tmp_path / "images" / "c.jpg").read_bytes()[:2] == b"\xff\xd8"

    anns = coco.loadAnns(coco.getAnnIds(imgIds=[1]))
    masked, plain = sorted(anns, key=lambda a: "segmentation" not in a)
    assert np.array_equal(coco.annToMask(masked).astype(bool), mask)
    assert masked["area"] == mask.sum() and masked["umg_mask_stability"] == 0.93
    x1, y1, x2, y2 = records[0].regions[1].box_xyxy
    assert plain["bbox"] == [x1, y1, x2 - x1, y2 - y1] and plain["area"] == (x2 - x1) * (y2 - y1)
    assert plain["umg_captions"] == [{"text": "a three number 1", "annotator": "ground_truth"}]
    assert coco.loadCats(plain["category_id"])[0]["name"] == "three"

    raw = json.loads((tmp_path / "coco.json").read_text())
    assert {b["label"] for b in raw["umg_background"]} == {"sky"}
    assert len({a["id"] for a in raw["annotations"]}) == 6
