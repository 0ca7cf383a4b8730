"""Dense training data: COCO panoptic (stuff trains), FC-CLIP's large-scale jitter, the schedule, FC-CLIP's sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from data_schemas import load_config
from data_schemas.adapt_config import SegAdaptConfig
from flows.cli import app
from model.adapted import read_meta
from model.convpass import add_convpass
from model.dense.augment import PAD_VALUE, DenseTrainTransform, JitterDraw, large_scale_jitter
from model.dense.data import CocoPanopticMasks, coco_source, dense_dataset
from model.dense.model import DenseUMG
from model.dense.train import multistep_factor
from model.dense.vocabulary import synonym_text_embeddings
from model.factory import create_umg_clip, tokenizer_for
from model.loading import create_model_and_transforms
from model.preprocess import eval_transform
from pipeline.sample_data.eval_formats import id_to_rgb

pytestmark = pytest.mark.usefixtures("single_thread")


def test_large_scale_jitter_geometry_by_hand():
    image = torch.zeros(3, 100, 200)
    image[:, :50, :100] = 1.0  # top-left quarter white
    masks = (image[:1] > 0).float()
    # scale 0.5 of 64: factor min(32 / 100, 32 / 200) = 0.16 -> 16 x 32, then padded to 64 x 64
    out, out_masks = large_scale_jitter(image, masks, 64, JitterDraw(0.5, 0.3, 0.7, flip=False))
    assert out.shape == (3, 64, 64) and out_masks.shape == (1, 64, 64)
    assert out_masks[0, :8, :16].eq(1).all() and out_masks.sum() == 8 * 16
    assert torch.allclose(out[:, 16:, :], torch.full((3, 48, 64), PAD_VALUE))
    # scale 2: factor min(128 / 100, 128 / 200) = 0.64 -> 64 x 128, crop 64 wide at offset round(64 * 0.5) = 32
    out, out_masks = large_scale_jitter(image, masks, 64, JitterDraw(2.0, 0.0, 0.5, flip=False))
    assert out_masks[0, :32, :32].eq(1).all() and out_masks[0, :, 32:].eq(0).all() and out_masks[0, 32:].eq(0).all()
    flipped, flipped_masks = large_scale_jitter(image, masks, 64, JitterDraw(2.0, 0.0, 0.5, flip=True))
    assert torch.equal(flipped_masks, out_masks.flip(-1))  # flip then the centre crop: mirror image


def test_without_jitter_the_training_image_is_the_eval_input():
    umg = create_umg_clip("umg-tiny-vit")
    pil = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8))
    pre = umg.clip.visual.preprocess_cfg
    transform = DenseTrainTransform(128, eval_transform(umg), pre["mean"], pre["std"])
    pixels, masks = transform(pil, torch.ones(2, 60, 90))
    assert torch.equal(pixels, eval_transform(umg)(pil)) and masks.shape == (2, 128, 128) and masks.eq(1).all()
    jitter = DenseTrainTransform(96, eval_transform(umg), pre["mean"], pre["std"], (0.5, 1.5))
    assert jitter(pil, torch.ones(2, 60, 90))[0].shape == (3, 96, 96)


def _panoptic_root(tmp_path):
    """Two 32 x 48 images: sky (stuff) on top, a dog (thing) and a crowd of dogs below."""
    root = tmp_path / "coco"
    (root / "images" / "train").mkdir(parents=True)
    pngs = root / "annotations" / "panoptic_train"
    pngs.mkdir(parents=True)
    images, annotations = [], []
    for index in range(2):
        seg = np.zeros((32, 48), dtype=np.int64)
        seg[:16] = 7           # sky
        seg[16:, :20] = 9      # dog
        seg[16:, 30:] = 11     # crowd of dogs
        Image.fromarray(np.full((32, 48, 3), 40 * index, dtype=np.uint8)).save(root / "images" / "train" / f"{index}.jpg")
        Image.fromarray(id_to_rgb(seg)).save(pngs / f"{index}.png")
        images.append({"id": index + 1, "file_name": f"{index}.jpg", "height": 32, "width": 48})
        annotations.append({"image_id": index + 1, "file_name": f"{index}.png", "segments_info": [
            {"id": 7, "category_id": 184, "iscrowd": 0}, {"id": 9, "category_id": 18, "iscrowd": 0},
            {"id": 11, "category_id": 18, "iscrowd": 1}]})
    categories = [{"id": 18, "name": "dog", "isthing": 1}, {"id": 184, "name": "sky, sky other", "isthing": 0}]
    (root / "annotations" / "panoptic_train.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}))
    return root


def test_panoptic_source_trains_stuff_and_leaves_crowds_out(tmp_path):
    root = _panoptic_root(tmp_path)
    source = coco_source(root)  # panoptic_train.json is preferred over instances
    assert source.kind == "panoptic" and source.panoptic_masks == root / "annotations" / "panoptic_train"
    identity = lambda image, masks: (torch.zeros(3, 1, 1), masks)  # noqa: E731
    dataset = dense_dataset(source, identity)
    assert isinstance(dataset, CocoPanopticMasks) and dataset.classnames == ["dog", "sky, sky other"]
    _, masks, labels = dataset[0]
    assert labels.tolist() == [1, 0]  # sky (stuff) is a target; the crowd is not
    assert masks[0, :16].eq(1).all() and masks[0].sum() == 16 * 48 and masks[1].sum() == 16 * 20
    only_sky = dense_dataset(source, identity, ["sky, sky other"])
    assert [lab.tolist() for _, _, lab in (only_sky[i] for i in range(2))] == [[0], [0]]
    with pytest.raises(ValueError, match="not among the categories"):
        dense_dataset(source, identity, ["cat"])


def test_multistep_schedule_is_detectron2s():
    cfg = SegAdaptConfig()
    factors = [multistep_factor(s, 1000, 0, cfg.lr_milestones, 0.1) for s in (0, 888, 889, 962, 963, 999)]
    assert factors == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    assert multistep_factor(4, 100, 10, [0.5], 0.1) == pytest.approx(0.5)


def test_fcclip_config_has_fcclips_sizes_and_builds():
    config = Path(__file__).resolve().parents[3] / "configs" / "adapt_fcclip.yaml"
    cfg = load_config(config, [], model=SegAdaptConfig, section="adapt_seg")
    head = cfg.head
    assert (head.hidden_dim, head.num_queries, head.decoder_layers, head.encoder_layers) == (256, 250, 10, 6)
    assert (cfg.input_size, cfg.scale_range, cfg.steps, cfg.batch_size) == (1024, (0.1, 2.0), 368750, 16)
    assert cfg.ensemble.object_mask_threshold == 0.0 and not cfg.ensemble.ensemble_on_valid_mask
    umg = add_convpass(create_umg_clip("umg-tiny-vit"))
    model = DenseUMG(umg, head, cfg.ensemble, synonym_text_embeddings(umg.eval(), tokenizer_for(umg), ["a", "b"]))
    with torch.no_grad():
        stages = model.eval()(torch.randn(1, 3, 64, 64), model.seen_text_emb)
    assert len(stages) == 10 and stages[-1]["class_queries_logits"].shape == (1, 250, 3)


def test_umg_adapt_seg_on_panoptic_with_jitter_at_another_size(tmp_path, tiny_checkpoint):
    root = _panoptic_root(tmp_path)
    out = tmp_path / "adapted"
    result = CliRunner().invoke(app, [
        "adapt", "--task", "seg", "--checkpoint", str(tiny_checkpoint[1]), "--data", str(root), "--out", str(out),
        "--steps", "2", "--set", "batch_size=2", "--set", "head.num_queries=4", "--set", "head.train_num_points=64",
        "--set", "input_size=96", "--set", "scale_range=[0.5,1.5]"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "schedule from config" in text and "adapt_smoke.yaml" in text and "not the paper's" in text
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["config"].endswith("adapt_smoke.yaml")
    meta = read_meta(out)
    assert meta.input_size == 96 and meta.classnames == ["dog", "sky, sky other"]
    model, preprocess, _ = create_model_and_transforms(str(out))
    assert preprocess(Image.new("RGB", (48, 32))).shape == (3, 96, 96)
