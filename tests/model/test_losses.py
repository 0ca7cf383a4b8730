import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from model.losses import LOSS_KEYS, UMGLoss, build_tag_targets, contrastive_loss, tag_loss, total_loss


def test_build_tag_targets_with_overlapping_tags():
    vocab, targets = build_tag_targets([["dog", "grass"], ["dog"], ["cat", "grass"], []])
    assert vocab == ["cat", "dog", "grass"]
    assert targets.tolist() == [[0, 1, 1], [0, 1, 0], [1, 0, 1], [0, 0, 0]]


def test_contrastive_loss_hand_computed():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    s = 2.0
    # logits[i, j] = s * a_i . b_j = s * [[0.6, 0], [0.8, 1]]
    row = (-math.log(math.exp(0.6 * s) / (math.exp(0.6 * s) + 1))
           - math.log(math.exp(s) / (math.exp(0.8 * s) + math.exp(s)))) / 2
    col = (-math.log(math.exp(0.6 * s) / (math.exp(0.6 * s) + math.exp(0.8 * s)))
           - math.log(math.exp(s) / (1 + math.exp(s)))) / 2
    assert contrastive_loss(a, b, torch.tensor(s)).item() == pytest.approx((row + col) / 2, rel=1e-6)


def test_tag_loss_hand_computed_with_overlapping_tags():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tags = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    targets = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # image 0 has both tags, image 1 the second
    # sims [[1, .6], [0, .8]] -> |d| = [0, .4, 0, .2] -> 0.5 d^2 = [0, .08, 0, .02] -> mean .025
    assert tag_loss(emb, tags, targets).item() == pytest.approx(0.025, rel=1e-6)
    # beyond beta the loss is linear: |d| - beta / 2
    assert tag_loss(emb[:1], -emb[:1], torch.ones(1, 1), beta=0.5).item() == pytest.approx(2 - 0.25)
    with pytest.raises(ValueError):
        tag_loss(emb, tags, targets[:1])


def test_umg_loss_names_lambdas_and_total():
    torch.manual_seed(0)
    e = lambda n: F.normalize(torch.randn(n, 8), dim=-1)
    img, cap, reg, regcap, tags, rtags = e(4), e(4), e(5), e(5), e(3), e(2)
    it, rt = torch.randint(0, 2, (4, 3)).float(), torch.randint(0, 2, (5, 2)).float()
    base = UMGLoss()(img, cap, reg, regcap, tags, it, rtags, rt, torch.tensor(10.0))
    scaled = UMGLoss(lambda_image_tag=2.0, lambda_region_tag=0.5)(img, cap, reg, regcap, tags, it, rtags, rt,
                                                                 torch.tensor(10.0))
    assert tuple(base) == LOSS_KEYS
    assert scaled["image_tag_loss"].item() == pytest.approx(2 * base["image_tag_loss"].item())
    assert scaled["region_tag_loss"].item() == pytest.approx(0.5 * base["region_tag_loss"].item())
    assert base["region_caption_loss"].item() == pytest.approx(contrastive_loss(reg, regcap, torch.tensor(10.)).item())
    assert total_loss(base).item() == pytest.approx(sum(v.item() for v in base.values()))


def test_zero_regions_and_no_tags_give_zero_with_grad_path():
    img = F.normalize(torch.randn(2, 4), dim=-1).requires_grad_()
    cap = F.normalize(torch.randn(2, 4), dim=-1)
    reg = torch.zeros(0, 4, requires_grad=True)
    scale = torch.tensor(10.0, requires_grad=True)
    out = UMGLoss()(img, cap, reg, torch.zeros(0, 4), None, None, torch.randn(3, 4), torch.zeros(0, 3), scale)
    for key in ("region_caption_loss", "image_tag_loss", "region_tag_loss"):
        assert out[key].item() == 0.0 and out[key].requires_grad
    total_loss(out).backward()
    assert torch.isfinite(img.grad).all() and reg.grad is not None and reg.grad.shape == (0, 4)
    out = UMGLoss()(img, cap, None, None, None, None, None, None, scale)
    assert out["region_caption_loss"].item() == 0.0


# ---- distributed: 2 gloo ranks with b images each == 1 process with 2b images --------------------------------

REGION_SPLITS = [(3, 1), (2, 0), (0, 0)]  # regions on rank 0 / rank 1


class _Towers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.image = nn.Linear(6, 4)
        self.text = nn.Linear(5, 4)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, batch):
        def img(x):
            return F.normalize(self.image(x), dim=-1)

        def txt(x):
            return F.normalize(self.text(x), dim=-1)

        return {
            "image_emb": img(batch["images"]), "caption_emb": txt(batch["captions"]),
            "region_emb": img(batch["regions"]), "region_caption_emb": txt(batch["region_captions"]),
            "image_tag_emb": txt(batch["tags"]), "image_tag_targets": batch["image_tag_targets"],
            "region_tag_emb": txt(batch["tags"][:2]), "region_tag_targets": batch["region_tag_targets"],
            "logit_scale": self.logit_scale.exp(),
        }


def _global_batch(regions: int, b: int = 2):
    g = torch.Generator().manual_seed(regions)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    return {
        "images": r(2 * b, 6), "captions": r(2 * b, 5), "tags": r(3, 5),
        "regions": r(regions, 6), "region_captions": r(regions, 5),
        "image_tag_targets": (r(2 * b, 3) > 0).float(), "region_tag_targets": (r(regions, 2) > 0).float(),
    }


def _rank_batch(split, rank: int, b: int = 2):
    full = _global_batch(sum(split), b)
    lo = sum(split[:rank])
    regions = slice(lo, lo + split[rank])
    images = slice(rank * b, (rank + 1) * b)
    per_image = ("images", "captions", "image_tag_targets")
    per_region = ("regions", "region_captions", "region_tag_targets")
    return {"tags": full["tags"], **{k: full[k][images] for k in per_image},
            **{k: full[k][regions] for k in per_region}}


def _loss_and_grads(batch):
    towers = _Towers()
    losses = UMGLoss()(**towers(batch))
    total_loss(losses).backward()
    return {k: v.item() for k, v in losses.items()}, {n: p.grad.clone() for n, p in towers.named_parameters()}


def _worker(rank: int, world: int, init_file: str, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = []
        for split in REGION_SPLITS:
            losses, grads = _loss_and_grads(_rank_batch(split, rank))
            for g in grads.values():  # what DDP does: average over ranks
                dist.all_reduce(g)
                g /= world
            results.append((losses, grads))
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_rank_gather_matches_single_process_loss_and_gradients(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "pg_init"), str(tmp_path)), nprocs=2, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for i, split in enumerate(REGION_SPLITS):
        losses, grads = _loss_and_grads(_global_batch(sum(split)))
        for rank_results in per_rank:
            rank_losses, rank_grads = rank_results[i]
            assert rank_losses == pytest.approx(losses, rel=1e-5, abs=1e-7), split
            for name, g in grads.items():
                torch.testing.assert_close(rank_grads[name], g, rtol=1e-5, atol=1e-6, msg=f"{split} {name}")
        assert all(math.isfinite(v) for v in losses.values())
