"""Trainer: optimizer groups, schedule, config, `umg train` learning on a fixed batch, checkpoint reload."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import model
from data_schemas import ConfigError, TrainConfig, load_config
from data_schemas.train_config import OptimSection
from flows.cli import app
from model.checkpoint import load_train_state, resolve_checkpoint
from model.factory import create_umg_clip
from model.launch import DistContext
from model.schedule import WarmupCosine, build_optimizer, param_groups
from model.trainer import Trainer, resolve_tars, schedule_steps
from pipeline.sample_shards import write_sample_shards

ROOT = Path(__file__).resolve().parents[2]
FAST = {"progress": False, "tensorboard": False, "plot": False, "data": {"workers": 0}}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core box: OpenMP hand-offs made a 30-step run 15x slower
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_sample_shards(out, n=10, seed=0, shard_size=16)  # train: exactly 8 images, one batch
    return out / "train"


def test_param_groups_split_towers_and_exempt_norms_biases_position_embeddings_logit_scale():
    torch.manual_seed(0)
    umg = create_umg_clip("umg-tiny-vit")
    optim = OptimSection(lr=1e-3, visual_lr=2e-4, text_lr=2e-5, weight_decay=0.05)
    groups = {g["name"]: g for g in param_groups(umg, optim)}
    assert list(groups) == ["visual", "visual_no_decay", "text", "text_no_decay", "other_no_decay"]
    names = {id(p): n for n, p in umg.named_parameters()}
    named = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    assert named["other_no_decay"] == {"clip.logit_scale"}
    # EVA-CLIP / open_clip decay the token embedding; position and class embeddings are exempt (EVA-CLIP)
    assert "clip.visual.conv1.weight" in named["visual"] and "clip.token_embedding.weight" in named["text"]
    assert "clip.positional_embedding" in named["text_no_decay"]
    assert {"clip.visual.ln_post.bias", "clip.visual.positional_embedding"} <= named["visual_no_decay"]
    assert "clip.transformer.resblocks.0.mlp.c_fc.weight" in named["text"]
    assert [(g["lr"], g["weight_decay"]) for g in groups.values()] == [
        (2e-4, 0.05), (2e-4, 0.0), (2e-5, 0.05), (2e-5, 0.0), (1e-3, 0.0)]
    assert sum(len(g) for g in named.values()) == len(names)
    lamb = build_optimizer(umg, optim)
    assert type(lamb).__name__ == "Lamb" and lamb.defaults["max_grad_norm"] is None  # we clip once, globally


@pytest.mark.parametrize("name", ["umg-tiny-vit", "umg-tiny-eva"])
def test_layer_decay_follows_eva_clip_layer_ids(name):
    torch.manual_seed(0)
    umg = create_umg_clip(name)
    optim = OptimSection(lr=1e-3, visual_lr=2e-4, text_lr=2e-5, visual_ld=0.5, text_ld=0.8)
    groups = param_groups(umg, optim)
    lr_of = {n: g["lr"] for g in groups for n, p in umg.named_parameters() if any(p is q for q in g["params"])}
    assert len(lr_of) == sum(1 for _ in umg.parameters())
    blocks = {t: 1 + max(int(n.split("blocks.")[1].split(".")[0]) for n in lr_of if ("visual" in n) == (t == "v")
                         and "blocks." in n) for t in ("v", "t")}
    v, t = blocks["v"], blocks["t"]  # depth; layer l trains at lr * ld ** (depth + 1 - l)
    patch = "clip.visual.trunk.patch_embed.proj.weight" if name == "umg-tiny-eva" else "clip.visual.conv1.weight"
    block0 = next(n for n in lr_of if "visual" in n and "blocks.0." in n)
    last = next(n for n in lr_of if "visual" in n and f"blocks.{v - 1}." in n)
    assert lr_of[patch] == pytest.approx(2e-4 * 0.5 ** (v + 1))
    assert lr_of[block0] == pytest.approx(2e-4 * 0.5 ** v) and lr_of[last] == pytest.approx(2e-4 * 0.5)
    text = "clip.text." if name == "umg-tiny-eva" else "clip."  # EVA configs use open_clip's CustomTextCLIP
    assert lr_of[f"{text}token_embedding.weight"] == pytest.approx(2e-5 * 0.8 ** (t + 1))
    assert lr_of[f"{text}transformer.resblocks.1.mlp.c_fc.weight"] == pytest.approx(2e-5 * 0.8 ** (t - 1))
    assert lr_of[f"{text}ln_final.weight"] == pytest.approx(2e-5) and lr_of["clip.logit_scale"] == 1e-3
    assert len({g["name"] for g in groups}) == len(groups)
    # the trainer logs each tower's top-layer rate
    assert max(g["lr"] for g in groups if g["tower"] == "visual") == pytest.approx(2e-4)


def test_warmup_then_cosine():
    factor = WarmupCosine(warmup=4, total=12, min_ratio=0.1)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(8) == pytest.approx(0.1 + 0.9 * 0.5) and factor(12) == pytest.approx(0.1)
    values = [factor(s) for s in range(3, 13)]
    assert values == sorted(values, reverse=True)


def test_train_config_section_overrides_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("build:\n  shard_size: 4\ntrain:\n  batch_size: 4\n  optim:\n    visual_lr: 1.0e-4\n")
    cfg = load_config(path, ["steps=7", "loss.tag_vocab=rank"], model=TrainConfig, section="train")
    assert (cfg.batch_size, cfg.steps, cfg.optim.visual_lr, cfg.loss.tag_vocab) == (4, 7, 1e-4, "rank")
    assert TrainConfig().steps == 100 and TrainConfig(epochs=2).steps is None
    paper = load_config(ROOT / "configs" / "umg41m_train.yaml", model=TrainConfig, section="train")
    assert (paper.model.name, paper.epochs, paper.optim.name, paper.model.cluster.reduction) == (
        "EVA02-B-16", 10, "lamb", 0.75)
    assert (paper.optim.visual_ld, paper.optim.text_ld, paper.loss.duplicate_captions) == (0.75, 0.75, "mask")
    assert (paper.optim.lamb, paper.optim.lamb_trust_range, paper.loss.contrastive_chunk) == (
        "deepspeed", (0.01, 10.0), 8192)  # EVA-CLIP's FusedLamb; the region term streamed at paper scale
    with pytest.raises(ConfigError, match=r"optim\.betaz: Extra inputs"):
        load_config(path, ["optim.betaz=1"], model=TrainConfig, section="train")
    with pytest.raises(ConfigError, match="either steps or epochs"):
        load_config(path, ["steps=3", "epochs=1"], model=TrainConfig, section="train")
    with pytest.raises(ConfigError, match=r"data\.crop_scale"):
        load_config(path, ["data.crop_scale=[0.9, 0.5]"], model=TrainConfig, section="train")


def test_paper_448_config_builds_b16_at_448_with_clustering():
    from model.checkpoint import model_from_config

    cfg = load_config(ROOT / "configs" / "umg41m_train_448.yaml", model=TrainConfig, section="train")
    assert (cfg.model.name, cfg.model.image_size, cfg.model.cluster.reduction) == ("EVA02-B-16", 448, 0.75)
    umg = model_from_config(cfg.model, initial_weights=False)  # no weights fetched
    trunk = umg.clip.visual.trunk
    assert trunk.patch_embed.grid_size == (28, 28) and umg.clip.visual.preprocess_cfg["size"] == (448, 448)
    assert trunk.pos_embed.shape[1] == 1 + 28 * 28 and trunk.rope.get_embed().shape[0] == 28 * 28
    assert umg.cluster.num_kept(28 * 28) == 196 and umg.cluster.layer == cfg.model.cluster.layer < len(trunk.blocks)
    assert umg.open_clip_config["model_cfg"]["vision_cfg"]["image_size"] == 448  # saved with checkpoints


def test_image_size_override_resamples_pretrained_position_embeddings(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    # weights at the tower's own size (timm eva02_tiny: 224 px, 16 x 16), as EVA-CLIP's B/16 weights are 224 px
    small = create_umg_clip("umg-tiny-eva", image_size=224)
    save_file({k: v.contiguous() for k, v in small.clip.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    large = create_umg_clip("umg-tiny-eva", pretrained=str(tmp_path / "clip.safetensors"), image_size=336)
    old, new = small.clip.visual.trunk.pos_embed, large.clip.visual.trunk.pos_embed
    assert new.shape == (1, 1 + 24 * 24, old.shape[-1]) and large.clip.visual.trunk.patch_embed.grid_size == (24, 24)
    assert torch.equal(new[:, :1], old[:, :1])  # the class position is kept; the grid is resampled from the weights
    resampled = torch.nn.functional.interpolate(old[:, 1:].reshape(1, 16, 16, -1).permute(0, 3, 1, 2),
                                                size=(24, 24), mode="bicubic", antialias=True)
    torch.testing.assert_close(new[:, 1:], resampled.permute(0, 2, 3, 1).reshape(1, 576, -1), rtol=1e-4, atol=1e-5)
    fc1 = [m.clip.visual.trunk.blocks[3].mlp.fc1.weight for m in (large, small)]
    assert torch.equal(*fc1)
    emb, grid = large.encode_image(torch.randn(1, 3, 336, 336))
    assert grid.shape == (1, 24, 24, 192) and torch.isfinite(emb).all()


def test_schedule_steps_from_epochs(shards, tmp_path):
    cfg = TrainConfig.model_validate({**FAST, "epochs": 10, "batch_size": 4, "optim": {"accum_steps": 2}})
    assert schedule_steps(cfg, 8, world_size=1) == 10 and schedule_steps(cfg, 8, world_size=2) == 5
    trainer = Trainer(cfg, resolve_tars(shards), tmp_path, DistContext(0, 1, 0, torch.device("cpu")))
    assert trainer.total_steps == 10 and trainer.data_cfg.samples_per_epoch == 8  # counted from shard stats
    with pytest.raises(FileNotFoundError, match="shards not found"):
        resolve_tars(shards / "missing")


def test_umg_train_learns_a_fixed_batch_and_checkpoint_reloads(shards, tmp_path):
    config = tmp_path / "smoke.yaml"
    config.write_text(
        "train:\n  batch_size: 8\n  steps: 30\n  data:\n    workers: 0\n    crop: full\n"
        "  optim:\n    lr: 1.0e-3\n    warmup_steps: 3\n  progress: false\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--shards", str(shards), "--out", str(out),
                                      "--set", "save_every=10"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 30 and set(summary["final_losses"]) >= {"loss", "region_caption_loss"}
    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    losses = [float(r["loss"]) for r in rows]
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    # One batch of 8 images (captions re-drawn each epoch): the tiny model memorises it.
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    assert all(math.isfinite(x) for x in losses)
    assert float(rows[0]["lr_visual"]) == pytest.approx(1e-3 / 3) and float(rows[-1]["lr_visual"]) < 1e-5
    assert (out / "loss_curve.png").stat().st_size > 1000 and any((out / "tb").iterdir())
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_00000020", "step_00000030"]  # keep_last = 2
    state = load_train_state(resolve_checkpoint(out))
    assert state["step"] == 30 and state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 30
    reloaded = model.load_checkpoint(out)
    init = create_umg_clip("umg-tiny-vit")
    assert not torch.equal(reloaded.clip.visual.conv1.weight, init.clip.visual.conv1.weight)
    assert reloaded.clip.logit_scale.shape == () and not reloaded.training


def test_load_checkpoint_gives_the_trained_model_outputs(shards, tmp_path):
    cfg = TrainConfig.model_validate({**FAST, "steps": 2, "batch_size": 4, "model": {"cluster": {
        "reduction": 0.5, "layer": 1}, "region_output_size": 2}})
    trainer = Trainer(cfg, resolve_tars(shards), tmp_path, DistContext(0, 1, 0, torch.device("cpu")))
    result = trainer.fit()
    batch = next(trainer.batches())
    inputs, _ = trainer._inputs(batch)
    for source in (tmp_path, result.checkpoint, result.checkpoint / "model.safetensors"):
        loaded = model.load_checkpoint(source)
        assert loaded.cluster is not None and loaded.cluster.reduction == 0.5 and loaded.region_output_size == 2
        with torch.no_grad():
            expected, got = trainer.model.eval()(**inputs), loaded(**inputs)
        assert all(torch.equal(expected[k], got[k]) for k in expected if expected[k] is not None)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        model.load_checkpoint(tmp_path / "checkpoints")
