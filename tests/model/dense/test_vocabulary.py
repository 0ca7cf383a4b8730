"""FC-CLIP's vocabulary handling: ViLD templates, synonyms split at commas, max over synonyms, seen classes."""

from __future__ import annotations

import pytest
import torch

from data_schemas.adapt_config import AdaptedCheckpoint, ConvpassSection, DenseHeadSection, EnsembleSection
from data_schemas.train_config import ModelSection
from model.adapted import load_adapted, parameters_of, save_adapted
from model.convpass import add_convpass
from model.dense.model import DenseUMG
from model.dense.vocabulary import VILD_TEMPLATES, class_logits, split_synonyms, synonym_text_embeddings
from model.eval.prompts import class_text_embeddings
from model.factory import create_umg_clip, tokenizer_for

HEAD = DenseHeadSection(num_queries=4, encoder_layers=1, decoder_layers=2, train_num_points=256)
pytestmark = pytest.mark.usefixtures("single_thread")


def test_split_synonyms_as_fc_clip():
    assert split_synonyms("building, edifice") == ["building", "edifice"]
    assert split_synonyms("car,auto, automobile") == ["car", "auto", "automobile"]
    assert split_synonyms("wall") == ["wall"]
    with pytest.raises(ValueError, match="no synonym"):
        split_synonyms(",")


def test_synonym_embeddings_pad_with_the_first_synonym_and_logits_take_the_max():
    umg = create_umg_clip("umg-tiny-vit").eval()
    tok = tokenizer_for(umg)
    emb = synonym_text_embeddings(umg, tok, ["zero, nought", "one"])
    assert emb.shape == (2, 2, umg.clip.text_projection.shape[1])
    each = class_text_embeddings(umg, tok, ["zero", "nought", "one"], VILD_TEMPLATES)
    assert torch.allclose(emb[0], each[:2]) and torch.allclose(emb[1], each[2:].expand(2, -1))
    feats = torch.nn.functional.normalize(torch.randn(5, emb.shape[-1]), dim=-1)
    by_hand = torch.stack([torch.maximum(feats @ each[0], feats @ each[1]), feats @ each[2]], dim=-1)
    assert torch.allclose(class_logits(feats, emb), by_hand, atol=1e-6)
    assert torch.allclose(class_logits(feats, each), feats @ each.T, atol=1e-6)  # (C, E) = one synonym


def _dense(classnames: list[str]) -> DenseUMG:
    torch.manual_seed(0)
    umg = add_convpass(create_umg_clip("umg-tiny-vit"))
    return DenseUMG(umg, HEAD, EnsembleSection(), synonym_text_embeddings(umg.eval(), tokenizer_for(umg), classnames))


def test_dense_model_scores_a_class_by_its_best_synonym_and_sees_shared_synonyms(tmp_path):
    model = _dense(["zero, nought", "one"]).eval()
    tok = tokenizer_for(model.umg)
    test = synonym_text_embeddings(model.umg, tok, ["two, one", "nought", "three"])
    assert model.seen_classes(test).tolist() == [True, True, False]
    images = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        both = model(images, test)[-1]["class_queries_logits"]
        first = model(images, test[:, 0])[-1]["class_queries_logits"]
        second = model(images, test[:, 1])[-1]["class_queries_logits"]
    assert torch.allclose(both[..., :-1], torch.maximum(first, second)[..., :-1], atol=1e-5)
    assert torch.allclose(both[..., -1], first[..., -1])  # void
    meta = AdaptedCheckpoint(task="seg", base_checkpoint="umg-tiny-vit", base_model=ModelSection(),
                             open_clip_config=model.umg.open_clip_config, convpass=ConvpassSection(), head=HEAD,
                             ensemble=EnsembleSection(), classnames=["zero, nought", "one"],
                             parameters=parameters_of(model), steps=0)
    save_adapted(tmp_path, model, meta)
    loaded = load_adapted(tmp_path, "cpu")
    assert loaded.seen_classes(test).tolist() == [True, True, False]
    assert torch.equal(loaded.segment_semantic(images, test), model.segment_semantic(images, test))
