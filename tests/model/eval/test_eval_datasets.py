"""ImageFolder and COCO-captions readers: names, templates, and the errors for data that does not fit."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from model.eval.datasets import EvalDataError, read_coco_captions, read_image_folder


def _png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (1, 2, 3)).save(path)


def _size(image):
    return image.size


def test_image_folder_names_templates_and_order(tmp_path):
    for folder in ("b_cat", "a_dog"):
        _png(tmp_path / folder / "x.png")
    data = read_image_folder(tmp_path, _size)
    assert data.classnames == ["a dog", "b cat"] and data.templates is None and data.targets == [0, 1]
    assert data.images[0] == ((8, 6), 0)
    (tmp_path / "classnames.txt").write_text("dog\n\ncat\n")
    (tmp_path / "templates.txt").write_text("a {}\n{} here\n")
    data = read_image_folder(tmp_path, _size)
    assert data.classnames == ["dog", "cat"] and data.templates == ["a {}", "{} here"]
    with pytest.raises(FileNotFoundError, match="names.txt: no such file"):
        read_image_folder(tmp_path, _size, classnames_file=tmp_path / "names.txt")
    (tmp_path / "templates.txt").write_text("no slot\n")
    with pytest.raises(EvalDataError, match="templates.txt"):
        read_image_folder(tmp_path, _size)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        read_image_folder(tmp_path / "missing", _size)
    _png(tmp_path / "loose.png")
    with pytest.raises(EvalDataError, match="no class sub-folders"):
        read_image_folder(tmp_path, _size)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalDataError, match="empty"):
        read_image_folder(tmp_path, _size)


def _captions(tmp_path, images, annotations):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def test_coco_captions_rows_and_images_without_captions(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        _png(tmp_path / "imgs" / name)
    images = [{"id": 7, "file_name": "a.jpg"}, {"id": 3, "file_name": "b.jpg"}, {"id": 5, "file_name": "c.jpg"}]
    annotations = [{"image_id": 7, "caption": " one "}, {"image_id": 3, "caption": "two"},
                   {"image_id": 7, "caption": "three"}]
    data = read_coco_captions(tmp_path / "imgs", _captions(tmp_path, images, annotations), _size)
    # Rows are the captioned images in id order (3 -> b, 7 -> a); image 5 has no caption and is left out.
    assert [p.name for p in data.images.paths] == ["b.jpg", "a.jpg"]
    assert data.captions == ["one", "two", "three"] and data.caption_image == [1, 0, 1]


def test_coco_captions_errors(tmp_path):
    _png(tmp_path / "imgs" / "a.jpg")
    images = [{"id": 1, "file_name": "a.jpg"}]
    with pytest.raises(EvalDataError, match=r"image ids not in 'images': \[2\]"):
        read_coco_captions(tmp_path / "imgs", _captions(tmp_path, images, [{"image_id": 2, "caption": "x"}]), _size)
    with pytest.raises(EvalDataError, match="not a COCO captions file"):
        read_coco_captions(tmp_path / "imgs", _captions(tmp_path, images, [{"caption": "x"}]), _size)
    with pytest.raises(EvalDataError, match="no captions"):
        read_coco_captions(tmp_path / "imgs", _captions(tmp_path, images, []), _size)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_coco_captions(tmp_path / "imgs", tmp_path / "none.json", _size)
