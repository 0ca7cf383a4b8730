"""Cross-check: clip_benchmark's own zero-shot and retrieval code on a model exported with ``umg export-open-clip``
gives the figures ``umg eval`` gives on the same checkpoint and data (the digit-scene eval layouts).

The clip_benchmark side uses only clip_benchmark and open_clip: its ``load_open_clip`` on the exported
``local-dir:`` folder (model, transform, tokenizer), its ``mscoco_captions`` dataset builder and collate
function for retrieval, torchvision's ``ImageFolder`` (what its classification builders use) with the
folder's classnames and templates for classification, and ``zeroshot_classification.evaluate`` /
``zeroshot_retrieval.evaluate`` with ``amp=False`` (``umg eval`` runs fp32).

One shim: clip_benchmark 1.6.2's ``accuracy`` ends in ``float(<1-element 1-D numpy array>)``, which numpy >= 2.4
refuses ("only 0-dimensional arrays can be converted"); :func:`_accuracy` is the same function with ``.item()``
there, patched in for the classification test only.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from model.eval.datasets import read_lines

zs_metrics = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
ret_metrics = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")


@pytest.fixture(scope="module")
def digit_eval(tmp_path_factory):
    from pipeline.sample_data import generate_sample
    from pipeline.sample_data.eval_formats import write_eval_layouts

    root = tmp_path_factory.mktemp("digits")
    generate_sample(root, n=16, seed=0)
    write_eval_layouts(root, per_class=2)  # 10 classes x 2 non-square single-digit scenes per split
    return root


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("oc")
    result = CliRunner().invoke(app, ["export-open-clip", str(tiny_checkpoint[0]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    from clip_benchmark.models.open_clip import load_open_clip

    model, transform, tokenizer = load_open_clip(f"local-dir:{out}", pretrained=None, device="cpu")
    return model.eval(), transform, tokenizer


def _accuracy(output, target, topk=(1,)):
    """clip_benchmark 1.6.2 ``zeroshot_classification.accuracy`` verbatim but for ``.item()`` (module doc)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [float(correct[:k].reshape(-1).float().sum(0, keepdim=True).item()) / n for k in topk]


def _umg_eval(*args) -> dict:
    result = CliRunner().invoke(app, ["eval", *map(str, args)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_zeroshot_classification_equals_clip_benchmark(tiny_checkpoint, digit_eval, exported, monkeypatch):
    from torchvision.datasets import ImageFolder

    monkeypatch.setattr(zs_metrics, "accuracy", _accuracy)
    data = digit_eval / "classification" / "test"
    ours = _umg_eval("zeroshot", "--checkpoint", tiny_checkpoint[0], "--data", data, "--batch-size", 8)
    model, transform, tokenizer = exported
    dataset = ImageFolder(str(data), transform=transform)
    classnames = read_lines(data / "classnames.txt")
    templates = [t.replace("{}", "{c}") for t in read_lines(data / "templates.txt")]  # clip_benchmark's slot
    loader = torch.utils.data.DataLoader(dataset, batch_size=8)
    theirs = zs_metrics.evaluate(model, loader, tokenizer, classnames, templates, "cpu", amp=False)
    assert ours["preprocess"] == "model" and ours["n_classes"] == 10 and ours["n_images"] == 20
    assert ours["metrics"] == pytest.approx(theirs, abs=1e-6)
    assert 0.0 < theirs["acc5"] < 1.0  # a real top-5 figure, not a degenerate one

    # fewer than 5 classes: clip_benchmark's acc5 is NaN, ours null
    few = digit_eval / "few"
    few.mkdir()
    for digit in ("0", "1", "2"):
        (few / digit).symlink_to(data / digit, target_is_directory=True)
    (few / "classnames.txt").write_text("\n".join(classnames[:3]) + "\n")
    (few / "templates.txt").write_text((data / "templates.txt").read_text())
    ours = _umg_eval("zeroshot", "--checkpoint", tiny_checkpoint[0], "--data", few)
    theirs = zs_metrics.evaluate(model, torch.utils.data.DataLoader(ImageFolder(str(few), transform=transform)),
                                 tokenizer, classnames[:3], templates, "cpu", amp=False)
    assert theirs["acc5"] != theirs["acc5"] and ours["metrics"]["acc5"] is None  # NaN there, null here
    assert ours["metrics"]["acc1"] == pytest.approx(theirs["acc1"])


def test_retrieval_equals_clip_benchmark_on_its_mscoco_builder(tiny_checkpoint, digit_eval, exported, tmp_path):
    from clip_benchmark.datasets.builder import build_dataset, get_dataset_collate_fn

    images, captions = digit_eval / "images" / "train", digit_eval / "annotations" / "captions_train.json"
    ours = _umg_eval("retrieval", "--checkpoint", tiny_checkpoint[0], "--images", images, "--captions", captions)
    model, transform, tokenizer = exported
    (tmp_path / "val2014").symlink_to(images, target_is_directory=True)  # the builder's layout of COCO's test split
    dataset = build_dataset("mscoco_captions", root=str(tmp_path), transform=transform, split="test",
                            annotation_file=str(captions), download=False, task="zeroshot_retrieval")
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=get_dataset_collate_fn("mscoco_captions"))
    theirs = ret_metrics.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    assert ours["n_images"] == len(dataset) == 13
    assert ours["metrics"] == pytest.approx(theirs, abs=1e-6)
    assert any(0.0 < v < 1.0 for v in theirs.values())
