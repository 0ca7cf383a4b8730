"""``create_model_and_transforms`` for every name form; checkpoints carry their open_clip config."""

from __future__ import annotations

import json
import shutil

import open_clip
import pytest
import torch
from PIL import Image

from data_schemas import TrainConfig
from model.checkpoint import OPEN_CLIP_CONFIG, load_checkpoint, model_from_config, save_checkpoint
from model.loading import create_model_and_transforms, split_name
from model.token_cluster import TokenClusterCfg

IMAGE = Image.new("RGB", (40, 30), (200, 10, 10))


def _embedding(model, preprocess, tokenizer):
    with torch.no_grad():
        return model.encode_image(preprocess(IMAGE)[None])[0], model.encode_text(tokenizer(["a photo of a three"]))


@pytest.mark.parametrize("form", ["run", "checkpoint", "safetensors"])
def test_checkpoint_path_forms_load_the_same_model(tiny_checkpoint, form):
    run, ckpt = tiny_checkpoint
    path = {"run": run, "checkpoint": ckpt, "safetensors": ckpt / "model.safetensors"}[form]
    model, preprocess, tokenizer = create_model_and_transforms(str(path))
    assert not model.training and model.cluster == TokenClusterCfg(reduction=0.75, layer=1)
    assert not model.cluster_in_eval
    reference = load_checkpoint(ckpt)
    (img, txt), (img_ref, txt_ref) = _embedding(model, preprocess, tokenizer), _embedding(reference, preprocess,
                                                                                          tokenizer)
    assert torch.equal(img, img_ref) and torch.equal(txt, txt_ref)
    assert json.loads((ckpt / OPEN_CLIP_CONFIG).read_text())["model_cfg"] == open_clip.get_model_config("umg-tiny-vit")


def test_open_clip_name_and_errors(tmp_path):
    model, preprocess, tokenizer = create_model_and_transforms("umg-tiny-vit", cluster_in_eval=True)
    assert not model.training and model.cluster_in_eval and preprocess(IMAGE).shape == (3, 128, 128)
    assert tokenizer(["x"]).shape == (1, 32)
    assert split_name("EVA02-B-16:merged2b_s8b_b131k") == ("EVA02-B-16", "merged2b_s8b_b131k")
    assert split_name("local-dir:/a/b") == ("local-dir:/a/b", None)
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        create_model_and_transforms("no-such-model")
    with pytest.raises(FileNotFoundError, match="missing"):
        create_model_and_transforms(str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="not a known tag"):
        create_model_and_transforms("umg-tiny-vit:no-such-tag")


def test_checkpoint_from_a_local_dir_model_loads_after_the_dir_is_gone(tmp_path):
    # An unregistered config (a different width), reachable only through local-dir:.
    cfg = open_clip.get_model_config("umg-tiny-vit")
    cfg["vision_cfg"]["width"] = 96
    source = tmp_path / "towers"
    source.mkdir()
    (source / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {"mean": [0.5] * 3}}))
    config = TrainConfig.model_validate({"model": {"name": f"local-dir:{source}"}})
    torch.manual_seed(0)
    model = model_from_config(config.model)
    ckpt = save_checkpoint(tmp_path / "run", 3, model, config, {"step": 3})
    shutil.rmtree(source)

    loaded, preprocess, tokenizer = create_model_and_transforms(str(tmp_path / "run"))
    assert loaded.clip.visual.conv1.weight.shape[0] == 96
    assert tuple(loaded.clip.visual.preprocess_cfg["mean"]) == (0.5, 0.5, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with torch.no_grad():
        assert torch.allclose(model.eval().encode_image(preprocess(IMAGE)[None])[0],
                              loaded.encode_image(preprocess(IMAGE)[None])[0])
    assert json.loads((ckpt / OPEN_CLIP_CONFIG).read_text())["model_cfg"]["vision_cfg"]["width"] == 96


def test_checkpoint_without_open_clip_config_loads_by_name(tiny_checkpoint, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_checkpoint[1], old)
    (old / OPEN_CLIP_CONFIG).unlink()
    model, _, _ = create_model_and_transforms(str(old))
    assert model.clip.visual.conv1.weight.shape[0] == 64


def test_adapted_dir_goes_to_load_adapted(tmp_path, monkeypatch):
    import sys
    import types

    (tmp_path / "adapt.json").write_text("{}")
    calls = []

    def load_adapted(path, device):
        calls.append((path, device))
        from model.factory import create_umg_clip

        return create_umg_clip("umg-tiny-vit")

    fake = types.ModuleType("model.adapted")  # pet's module; only its entry point matters here
    fake.load_adapted = load_adapted
    monkeypatch.setitem(sys.modules, "model.adapted", fake)
    model, _, _ = create_model_and_transforms(str(tmp_path))
    assert calls == [(tmp_path, "cpu")] and not model.training
