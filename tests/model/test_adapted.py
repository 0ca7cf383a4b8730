"""Adapted checkpoints: save/load round trip, `umg adapt --task global` through the CLI, loading, errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from data_schemas.adapt_config import AdaptedCheckpoint, ConvpassSection
from data_schemas.train_config import ModelSection
from flows.cli import app
from model.adapted import load_adapted, parameters_of, read_meta, save_adapted
from model.checkpoint import load_checkpoint
from model.convpass import ConvpassCfg, add_convpass
from model.factory import create_umg_clip, get_tokenizer
from model.loading import create_model_and_transforms
from pipeline.sample_data import generate_sample
from pipeline.sample_data.eval_formats import write_eval_layouts
from pipeline.sample_shards import write_sample_shards

FAST = ["--set", "train.progress=false", "--set", "train.plot=false", "--set", "train.tensorboard=false",
        "--set", "train.batch_size=4"]
IMAGE = Image.new("RGB", (50, 40), (30, 160, 20))


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_sample_shards(out, n=10, seed=0, shard_size=16)
    return out / "train"


def test_global_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = add_convpass(create_umg_clip("umg-tiny-vit"), ConvpassCfg(dim=4)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter_" in name:
                p.normal_(std=0.05)  # trained-looking adapters, so the check is not of zeros
    meta = AdaptedCheckpoint(task="global", base_checkpoint="umg-tiny-vit", base_model=ModelSection(),
                             open_clip_config=model.open_clip_config, convpass=ConvpassSection(dim=4),
                             parameters=parameters_of(model), steps=0)
    save_adapted(tmp_path, model, meta)
    loaded = load_adapted(tmp_path, "cpu")
    images, tokens = torch.randn(2, 3, 128, 128), get_tokenizer("umg-tiny-vit")(["a two", "five"])
    with torch.no_grad():
        (emb, grid), (emb2, grid2) = model.encode_image(images), loaded.encode_image(images)
        assert torch.equal(emb, emb2) and torch.equal(grid, grid2)
        assert torch.equal(model.encode_text(tokens), loaded.encode_text(tokens))
        base = create_umg_clip("umg-tiny-vit").eval()
        base.load_state_dict({k: v for k, v in model.state_dict().items() if ".adapter_" not in k})
        assert not torch.allclose(base.encode_image(images)[0], emb)
    assert read_meta(tmp_path).parameters.trainable == sum(p.numel() for n, p in model.named_parameters()
                                                           if ".adapter_" in n)


def test_umg_adapt_global_cli_writes_a_loadable_checkpoint(tmp_path, shards, tiny_checkpoint, monkeypatch):
    _, base_ckpt = tiny_checkpoint  # its config has token clustering on: adaptation turns it off
    out = tmp_path / "adapted"
    monkeypatch.chdir(tmp_path)  # the default config is found from any working directory
    result = CliRunner().invoke(app, ["adapt", "--task", "global", "--checkpoint", str(base_ckpt), "--shards",
                                      str(shards), "--out", str(out), "--steps", "2", *FAST])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["steps"] == 2 and 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["final_losses"]["region_caption_loss"] == 0.0 and summary["final_losses"]["image_caption_loss"] > 0
    meta = read_meta(out)
    assert meta.task == "global" and meta.base_model.cluster.reduction == 0.0 and meta.steps == 2
    model, preprocess, tokenizer = create_model_and_transforms(str(out))
    base, _, _ = create_model_and_transforms(str(base_ckpt))
    with torch.no_grad():
        emb = model.encode_image(preprocess(IMAGE)[None])[0]
        base_emb = base.encode_image(preprocess(IMAGE)[None])[0]
        text = model.encode_text(tokenizer(["a photo of a three"]))
    assert model.cluster is None and not torch.allclose(emb, base_emb)  # adapters trained and loaded
    assert torch.equal(text, base.encode_text(tokenizer(["a photo of a three"])))  # text tower frozen
    frozen = load_checkpoint(base_ckpt).state_dict()
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items() if ".adapter_" not in k)
    data = tmp_path / "digits"
    generate_sample(data, n=12, seed=0)
    write_eval_layouts(data, per_class=1)
    evaluated = CliRunner().invoke(app, ["eval", "zeroshot", "--checkpoint", str(out), "--data",
                                         str(data / "classification" / "val")])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.output.strip().splitlines()[-1])
    assert report["model"] == str(out) and report["n_images"] == 10 and 0 <= report["metrics"]["acc1"] <= 1


def test_umg_adapt_errors(tmp_path, shards):
    runner = CliRunner()
    cases = [
        (["--task", "detect", "--checkpoint", "umg-tiny-vit", "--out", str(tmp_path)], "--task must be one of"),
        (["--task", "global", "--checkpoint", "umg-tiny-vit", "--out", str(tmp_path)], "needs --shards"),
        (["--task", "global", "--checkpoint", str(tmp_path / "nope"), "--shards", str(shards), "--out",
          str(tmp_path / "o")], "nor an open_clip model name"),
        (["--task", "global", "--checkpoint", "umg-tiny-vit", "--shards", str(shards), "--out", str(tmp_path / "o"),
          "--set", "convpass.dimm=3"], "convpass.dimm"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["adapt", *args])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), (args, result.output)
