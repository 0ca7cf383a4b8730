"""Zero-shot classification and retrieval plumbing with a model whose answers are known exactly.

The "colour model" embeds an image as its normalised mean RGB and a text as the one-hot of the colour
word it contains, so every image is classified / retrieved correctly when classes, prompts, captions
and rows are wired up right — and wrongly when the class names are permuted.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from model.eval.retrieval import evaluate_retrieval
from model.eval.zeroshot import evaluate_zeroshot

COLOURS = {"red": (230, 10, 10), "green": (10, 230, 10), "blue": (10, 10, 230)}


class ColourModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.prompts_seen: list[int] = []

    def encode_image(self, images):  # (B, 3, H, W) in [0, 1]
        return F.normalize(images.mean(dim=(2, 3)), dim=-1), images.permute(0, 2, 3, 1)

    def encode_text(self, tokens):  # (T, 1) colour index
        self.prompts_seen.append(len(tokens))
        return F.one_hot(tokens[:, 0], 3).float()


def tokenizer(texts):
    return torch.tensor([[next(i for i, c in enumerate(COLOURS) if c in t)] for t in texts])


def to_tensor(image):
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def _save(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (10, 8), colour).save(path)


@pytest.fixture
def folder(tmp_path):
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(c + 1):  # 1, 2, 3 images per class
            _save(tmp_path / "data" / f"{c}{name}" / f"{i}.png", colour)
    return tmp_path / "data"


def test_zeroshot_scores_the_colour_model_exactly(folder):
    model = ColourModel()
    progress = []
    metrics, info = evaluate_zeroshot(model, to_tensor, tokenizer, folder, batch_size=4,
                                      progress=lambda done, total: progress.append((done, total)))
    assert metrics == {"acc1": 1.0, "acc5": None, "mean_per_class_recall": 1.0}  # 3 classes: top-5 undefined
    assert info["n_images"] == 6 and info["n_classes"] == 3 and progress == [(4, 6), (6, 6)]
    assert model.prompts_seen == [3 * len(info["templates"])]

    (folder / "templates.txt").write_text("a {} thing\n")
    (folder / "classnames.txt").write_text("green\nblue\nred\n")  # wrong order: every image misclassified
    metrics, info = evaluate_zeroshot(model, to_tensor, tokenizer, folder)
    assert metrics["acc1"] == 0.0 and metrics["mean_per_class_recall"] == 0.0 and info["templates"] == ["a {} thing"]


def test_retrieval_scores_the_colour_model_exactly(tmp_path):
    images, annotations = [], []
    for n, (name, colour) in enumerate(COLOURS.items()):
        _save(tmp_path / "imgs" / f"{name}.png", colour)
        images.append({"id": 100 - n, "file_name": f"{name}.png"})
        annotations += [{"image_id": 100 - n, "caption": f"{k} {name}"} for k in range(n + 1)]
    captions = tmp_path / "c.json"
    captions.write_text(json.dumps({"images": images, "annotations": annotations}))
    metrics, info = evaluate_retrieval(ColourModel(), to_tensor, tokenizer, tmp_path / "imgs", captions)
    assert info == {"n_images": 3, "n_captions": 6}
    assert all(metrics[f"{side}_retrieval_recall@1"] == 1.0 for side in ("image", "text"))
    assert metrics["text_retrieval_recall@5"] == 1.0  # 6 captions to rank
    # 3 images (and fewer than 10 captions): recall@k undefined above that
    assert metrics["image_retrieval_recall@5"] is None and metrics["text_retrieval_recall@10"] is None

    # Swap two files: the rows no longer match their captions.
    (tmp_path / "imgs" / "red.png").rename(tmp_path / "imgs" / "tmp.png")
    (tmp_path / "imgs" / "green.png").rename(tmp_path / "imgs" / "red.png")
    (tmp_path / "imgs" / "tmp.png").rename(tmp_path / "imgs" / "green.png")
    metrics, _ = evaluate_retrieval(ColourModel(), to_tensor, tokenizer, tmp_path / "imgs", captions)
    assert metrics["text_retrieval_recall@1"] == pytest.approx(1 / 3)  # only blue is right
    assert metrics["image_retrieval_recall@1"] == pytest.approx(3 / 6)  # blue's three captions


def test_grouped_retrieval_gives_repeated_captions_one_text_with_all_their_images(tmp_path):
    # Two identical red images share the caption "a red"; the green image has "a green" and "green".
    files = {"r1": COLOURS["red"], "r2": COLOURS["red"], "g": COLOURS["green"]}
    texts = {"r1": ["a red"], "r2": ["a red"], "g": ["a green", "green"]}
    images, annotations = [], []
    for n, (name, colour) in enumerate(files.items()):
        _save(tmp_path / "imgs" / f"{name}.png", colour)
        images.append({"id": n, "file_name": f"{name}.png"})
        annotations += [{"image_id": n, "caption": t} for t in texts[name]]
    captions = tmp_path / "c.json"
    captions.write_text(json.dumps({"images": images, "annotations": annotations}))

    standard, info = evaluate_retrieval(ColourModel(), to_tensor, tokenizer, tmp_path / "imgs", captions)
    # Each "a red" ties with the copy under the other red image (and the two red images tie): misses at k = 1.
    assert info == {"n_images": 3, "n_captions": 4}
    assert standard["text_retrieval_recall@1"] == pytest.approx(1 / 3)  # only the green image
    assert standard["image_retrieval_recall@1"] == pytest.approx(2 / 4)  # the two green captions

    grouped, info = evaluate_retrieval(ColourModel(), to_tensor, tokenizer, tmp_path / "imgs", captions,
                                       group_identical_texts=True)
    assert info["n_distinct_texts"] == 3 and info["protocol"] == "grouped_identical_texts"
    assert all(grouped[f"{side}_retrieval_recall@1"] == 1.0 for side in ("image", "text"))
