"""pipeline.sources.vg.VisualGenomeSource: phrase regions, VG_100K lookup, skipped regions."""

from __future__ import annotations

import json

import pytest

from pipeline.sources.base import Source
from pipeline.sources.vg import VisualGenomeSource


def region(region_id: int, phrase: str, x, y, w, h, image_id: int = 1) -> dict:
    return {"region_id": region_id, "image_id": image_id, "phrase": phrase, "x": x, "y": y, "width": w, "height": h}


@pytest.fixture
def vg_root(tmp_path, image_bytes):
    doc = [
        {"id": 10, "regions": []},
        {
            "id": 1,
            "regions": [
                region(11, "  a red ball on grass ", 3, 4, 10, 5),
                region(12, "flat", 3, 4, 10, 0),
                region(13, "", 1, 1, 2, 2),
                region(14, "a tree", -2, 0, 50, 60),
            ],
        },
        {"image_id": 2, "regions": [region(21, "a dog", 0, 0, 4, 4, image_id=2)]},
        {"id": 1, "regions": [region(15, "more from a second entry", 1, 1, 1, 1)]},
    ]
    (tmp_path / "region_descriptions.json").write_text(json.dumps(doc))
    (tmp_path / "1.jpg").write_bytes(image_bytes())
    (tmp_path / "VG_100K").mkdir()
    (tmp_path / "VG_100K" / "2.jpg").write_bytes(image_bytes(color=(0, 0, 255)))
    return tmp_path


def test_refs_sorted_numerically_and_stable(vg_root) -> None:
    source = VisualGenomeSource(vg_root / "region_descriptions.json", vg_root)
    assert isinstance(source, Source) and source.kind == "vg"
    assert source.list_refs() == ["000000000001", "000000000002", "000000000010"]
    assert VisualGenomeSource(vg_root / "region_descriptions.json", vg_root).list_refs() == source.list_refs()


def test_regions_use_the_phrase_as_label_and_caption(vg_root) -> None:
    source = VisualGenomeSource(vg_root / "region_descriptions.json", vg_root)
    (item,) = source.read(["000000000001"])
    assert item.error is None and item.key == "1" and item.source_id == "1.jpg"
    assert item.image_bytes == (vg_root / "1.jpg").read_bytes()
    regions = item.known.regions
    assert [r.id for r in regions] == [0, 3, 4]
    ball, tree, more = regions
    assert (ball.label, ball.box_xyxy, ball.score, ball.annotator) == ("a red ball on grass", (3, 4, 13, 9), 1.0,
                                                                       "ground_truth")
    assert [(c.text, c.annotator) for c in ball.captions] == [("a red ball on grass", "ground_truth")]
    assert tree.box_xyxy == (-2.0, 0.0, 48.0, 60.0)  # not clipped by the source
    assert more.label == "more from a second entry"  # duplicate image entries are merged
    assert item.known.notes == [
        "skipped region 1 (region_id 12): box [3.0, 4.0, 10.0, 0.0] has w<=0 or h<=0",
        "skipped region 2 (region_id 13): empty phrase",
    ]


def test_vg_100k_subfolder_and_missing_image(vg_root) -> None:
    source = VisualGenomeSource(vg_root / "region_descriptions.json", vg_root)
    refs = ["000000000010", "000000000002", "12345"]
    items = list(source.read(refs))
    assert len(items) == 3
    assert items[0].error == f"missing_image: {vg_root / '10.jpg'}" and items[0].image_bytes is None
    assert items[1].error is None and items[1].image_bytes == (vg_root / "VG_100K" / "2.jpg").read_bytes()
    assert [r.label for r in items[1].known.regions] == ["a dog"]
    assert items[2].error.startswith("bad_ref: ") and items[2].image_bytes is None


def test_wrong_json_shape_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "region_descriptions.json").write_text('{"regions": []}')
    with pytest.raises(ValueError, match="expected a list of images"):
        VisualGenomeSource(tmp_path / "region_descriptions.json", tmp_path).list_refs()


def test_ids_escaping_the_image_folder_and_entries_without_id_are_error_rows(tmp_path, image_bytes) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "secret.jpg").write_bytes(image_bytes())
    doc = [{"id": "../secret", "regions": []}, {"regions": []}, "junk"]
    (tmp_path / "images" / "region_descriptions.json").write_text(json.dumps(doc))
    source = VisualGenomeSource(tmp_path / "images" / "region_descriptions.json", tmp_path / "images")
    refs = source.list_refs()
    assert refs == ["!entries/1", "!entries/2", "../secret"]
    items = list(source.read(refs))
    assert [i.error.split(":")[0] for i in items] == ["bad_annotation", "bad_annotation", "outside_root"]
    assert all(i.image_bytes is None for i in items)


def test_the_json_is_streamed_a_shard_holds_its_own_regions_only(tmp_path, image_bytes) -> None:
    """Issue 20 class 8: VG's JSON (GBs) was loaded whole in every worker. ``read`` of two refs now keeps their
    regions only: its peak allocation is a small part of what parsing the whole file allocates."""
    import tracemalloc

    doc = [{"id": i, "regions": [region(i * 100 + r, f"phrase {r} of image {i}", r, r, 5, 5, image_id=i)
                                 for r in range(20)]} for i in range(600)]
    path = tmp_path / "region_descriptions.json"
    path.write_text(json.dumps(doc))
    del doc
    (tmp_path / "7.jpg").write_bytes(image_bytes())
    source = VisualGenomeSource(path, tmp_path)
    refs = source.list_refs()
    assert len(refs) == 600

    def peak(call) -> int:
        tracemalloc.start()
        try:
            call()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    whole = peak(lambda: json.loads(path.read_bytes()))
    streamed = peak(lambda: list(VisualGenomeSource(path, tmp_path).read(["000000000007", "000000000008"])))
    items = list(VisualGenomeSource(path, tmp_path).read(["000000000007", "000000000008"]))
    assert len(items[0].known.regions) == 20 and items[1].error.startswith("missing_image")
    assert streamed < whole / 10, (streamed, whole)


def test_python_json_with_nan_is_still_read(tmp_path, image_bytes) -> None:
    """The strict streaming parser refuses ``NaN`` (Python's ``json.dumps`` writes it); such a file is parsed
    whole, and the region with the NaN is skipped with a note as before."""
    doc = [{"id": 1, "regions": [region(1, "ok", 1, 1, 4, 4), region(2, "nan", float("nan"), 1, 4, 4)]}]
    (tmp_path / "region_descriptions.json").write_text(json.dumps(doc))
    (tmp_path / "1.jpg").write_bytes(image_bytes())
    (item,) = VisualGenomeSource(tmp_path / "region_descriptions.json", tmp_path).read(["000000000001"])
    assert [r.label for r in item.known.regions] == ["ok"] and "is not finite" in item.known.notes[0]
