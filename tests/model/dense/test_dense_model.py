"""The FC-CLIP-style dense model: shapes, gradients, seen classes, save/load, `umg adapt --task seg` via the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from data_schemas.adapt_config import AdaptedCheckpoint, ConvpassSection, DenseHeadSection, EnsembleSection
from data_schemas.train_config import ModelSection
from flows.cli import app
from model.adapted import load_adapted, parameters_of, read_meta, save_adapted
from model.convpass import add_convpass
from model.dense.model import DenseUMG
from model.eval.prompts import class_text_embeddings
from model.factory import create_umg_clip, tokenizer_for
from model.loading import create_model_and_transforms
from pipeline.sample_data import generate_sample
from pipeline.sample_data.eval_formats import write_eval_layouts

HEAD = DenseHeadSection(num_queries=6, encoder_layers=1, decoder_layers=2, train_num_points=256)
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


pytestmark = pytest.mark.usefixtures("single_thread")


def _dense(name: str = "umg-tiny-vit") -> DenseUMG:
    torch.manual_seed(0)
    umg = add_convpass(create_umg_clip(name))
    seen = class_text_embeddings(umg.eval(), tokenizer_for(umg), DIGITS[:3])
    return DenseUMG(umg, HEAD, EnsembleSection(), seen)


@pytest.mark.parametrize("name,size", [("umg-tiny-vit", 128), ("umg-tiny-eva", 112)])
def test_outputs_and_only_head_and_adapters_get_gradients(name, size):
    model = _dense(name).train()
    text = class_text_embeddings(model.umg, tokenizer_for(model.umg), DIGITS[:3])
    stages = model(torch.randn(2, 3, size, size), text)
    grid = size // (16 if name == "umg-tiny-vit" else 14)
    assert len(stages) == HEAD.decoder_layers  # transformers: the query prediction + decoder_layers - 1 layers
    assert stages[-1]["masks_queries_logits"].shape == (2, 6, 4 * grid, 4 * grid)
    assert stages[-1]["class_queries_logits"].shape == (2, 6, 4)
    sum(s["masks_queries_logits"].mean() + s["class_queries_logits"].mean() for s in stages).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads <= trainable and any(n.startswith("pyramid.") for n in grads)
    assert all(not n.startswith("umg.") or ".adapter_" in n for n in trainable)
    assert any(".adapter_" in n for n in grads)


def test_seen_classes_match_the_training_prompts_only():
    model = _dense()
    tok = tokenizer_for(model.umg)
    same = class_text_embeddings(model.umg, tok, ["two", "nine", "zero"])
    assert model.seen_classes(same).tolist() == [True, False, True]
    other_prompts = class_text_embeddings(model.umg, tok, ["two"], ["a blurry photo of {} things"])
    assert model.seen_classes(other_prompts).tolist() == [False]


def test_seg_round_trip_gives_identical_segmentations(tmp_path):
    model = _dense().eval()
    with torch.no_grad():
        for name, p in model.umg.named_parameters():
            if ".adapter_" in name:
                p.normal_(std=0.05)
    meta = AdaptedCheckpoint(task="seg", base_checkpoint="umg-tiny-vit", base_model=ModelSection(),
                             open_clip_config=model.umg.open_clip_config, convpass=ConvpassSection(), head=HEAD,
                             ensemble=EnsembleSection(), classnames=DIGITS[:3], parameters=parameters_of(model),
                             steps=0)
    save_adapted(tmp_path, model, meta)
    loaded = load_adapted(tmp_path, "cpu")
    text = class_text_embeddings(model.umg, tokenizer_for(model.umg), DIGITS)
    images = torch.randn(2, 3, 128, 128)
    assert torch.equal(model.segment_semantic(images, text), loaded.segment_semantic(images, text))
    things = torch.ones(10, dtype=torch.bool)
    for (seg, segs), (seg2, segs2) in zip(model.segment_panoptic(images, text, things),
                                          loaded.segment_panoptic(images, text, things)):
        assert torch.equal(seg, seg2) and segs == segs2
    assert loaded.seen_classes(text).tolist() == [True] * 3 + [False] * 7


def test_umg_adapt_seg_cli_trains_on_digits_0_4_and_segments_0_9(tmp_path, tiny_checkpoint):
    _, base = tiny_checkpoint
    data = tmp_path / "digits"
    generate_sample(data, n=12, seed=0)
    write_eval_layouts(data)  # label maps, panoptic PNGs, classes.txt and templates.txt for `umg eval seg`
    out = tmp_path / "seg"
    result = CliRunner().invoke(app, [
        "adapt", "--task", "seg", "--checkpoint", str(base), "--data", str(data), "--out", str(out), "--steps", "3",
        "--train-classes", "zero,one,two,three,four", "--set", "batch_size=2", "--set", "head.num_queries=6",
        "--set", "head.train_num_points=256"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["steps"] == 3 and 0 < summary["trainable_params"] < summary["total_params"]
    assert {"loss", "loss_cross_entropy", "loss_mask", "loss_dice"} == set(summary["final_losses"])
    assert read_meta(out).classnames == DIGITS[:5] and (out / "metrics.csv").read_text().count("\n") == 4
    model, preprocess, tokenizer = create_model_and_transforms(str(out))
    assert not model.training and hasattr(model, "segment_semantic") and model.umg.cluster is None
    text = class_text_embeddings(model.umg, tokenizer, DIGITS, ["{}", "a handwritten {}"])
    assert model.seen_classes(text).tolist() == [True] * 5 + [False] * 5
    from PIL import Image

    image = preprocess(Image.open(next((data / "images" / "val").glob("*.jpg"))))[None]
    probs = model.segment_semantic(image, text)
    assert probs.shape == (1, 10, 128, 128) and torch.allclose(probs.sum(1), torch.ones(1, 128, 128), atol=1e-5)
    (seg, segments), = model.segment_panoptic(image, F.normalize(text, dim=-1), torch.ones(10, dtype=torch.bool))
    assert seg.shape == (128, 128) and seg.dtype == torch.int64
    assert {s["id"] for s in segments} == set(seg.unique().tolist()) - {0}
    notes = data / "annotations"
    evaluated = CliRunner().invoke(app, [
        "eval", "seg", "--checkpoint", str(out), "--images", str(data / "images" / "train"), "--masks",
        str(notes / "semantic_train"), "--classes", str(notes / "classes.txt"), "--panoptic",
        str(notes / "panoptic_train.json"), "--limit", "3"])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.output.strip().splitlines()[-1])
    assert report["mode"] == "adapted" and report["n_classes"] == 10
    assert 0 <= report["metrics"]["miou"] <= 1 and 0 <= report["metrics"]["pq"] <= 1
    assert 0 <= report["metrics"]["mask_ap"] <= 1 and 0 <= report["metrics"]["mask_ap50"] <= 1
    short = CliRunner().invoke(app, [
        "eval", "seg", "--checkpoint", str(out), "--images", str(data / "images" / "train"), "--masks",
        str(notes / "semantic_train"), "--classes", str(notes / "classes.txt"), "--panoptic",
        str(notes / "panoptic_train.json"), "--limit", "2", "--short-side", "100"])  # non-square, padded inputs
    assert short.exit_code == 0, short.output
    report = json.loads(short.output.strip().splitlines()[-1])
    assert report["input"] == "short side 100, max 1333" and {"miou", "pq", "mask_ap"} <= set(report["metrics"])


def test_umg_adapt_seg_errors(tmp_path):
    data = tmp_path / "digits"
    generate_sample(data, n=4, seed=0)
    runner = CliRunner()
    cases = [
        (["--data", str(data), "--train-classes", "zero,eleven"], "not among the categories"),
        (["--data", str(tmp_path / "none")], "COCO instances file not found"),
        ([], "needs --data"),
        (["--annotations", str(data / "annotations" / "instances_train.json")], "and --images together"),
        (["--panoptic", str(data / "x.json"), "--annotations", str(data / "y.json")], "not both"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["adapt", "--task", "seg", "--checkpoint", "umg-tiny-vit", "--out",
                                     str(tmp_path / "o"), *args])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), (args, result.output)
