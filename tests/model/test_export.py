"""A checkpoint exported as an open_clip folder loads in plain open_clip with the same embeddings."""

from __future__ import annotations

import json

import open_clip
import torch
from typer.testing import CliRunner

from flows.cli import app
from model.checkpoint import load_checkpoint
from model.factory import get_tokenizer


def test_exported_folder_loads_in_open_clip_with_the_same_embeddings(tiny_checkpoint, tmp_path):
    result = CliRunner().invoke(app, ["export-open-clip", str(tiny_checkpoint[0]), "--out", str(tmp_path / "oc")])
    assert result.exit_code == 0, result.output
    name = json.loads(result.stdout.strip().splitlines()[-1])["open_clip_name"]
    clip, _, preprocess = open_clip.create_model_and_transforms(name)
    umg = load_checkpoint(tiny_checkpoint[1])
    images = torch.randn(2, 3, 128, 128)
    tokens = get_tokenizer("umg-tiny-vit")(["a photo of a three", "seven"])
    with torch.no_grad():
        assert torch.allclose(clip.eval().encode_image(images, normalize=True), umg.encode_image(images)[0], atol=1e-6)
        assert torch.allclose(clip.encode_text(tokens, normalize=True), umg.encode_text(tokens), atol=1e-6)
        assert torch.equal(clip.logit_scale, umg.clip.logit_scale)
    assert open_clip.get_tokenizer(name)(["seven"]).shape == (1, 32)

    failed = CliRunner().invoke(app, ["export-open-clip", str(tmp_path / "none"), "--out", str(tmp_path / "x")])
    assert failed.exit_code == 2 and "error:" in failed.stderr
