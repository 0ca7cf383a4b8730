import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from model.losses import (LOSS_KEYS, UMGLoss, build_tag_targets, contrastive_loss, contrastive_sum, tag_loss, text_ids,
                          total_loss)
from model.streamed_logsumexp import streamed_logsumexp


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


def _lse(*values):
    return math.log(sum(math.exp(v) for v in values))


A_DUP = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])  # images (or regions)
B_DUP = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # their captions: 0 and 2 are the same text
IDS_DUP = torch.tensor([7, 3, 7])
# logits a->b: [1, 0, 1], [0, 1, 0], [.6, .8, .6];  b->a: [1, 0, .6], [0, 1, .8], [1, 0, .6]


def test_identical_captions_masked_hand_computed():
    # the other same-text pair leaves both softmaxes (row 0: column 2, row 2: column 0)
    a_to_b = (_lse(1, 0) - 1) + (_lse(0, 1, 0) - 1) + (_lse(.8, .6) - .6)
    b_to_a = (_lse(1, 0) - 1) + (_lse(0, 1, .8) - 1) + (_lse(0, .6) - .6)
    got = contrastive_loss(A_DUP, B_DUP, torch.tensor(1.0), ids=IDS_DUP, duplicates="mask")
    assert got.item() == pytest.approx((a_to_b + b_to_a) / 6, rel=1e-6)
    assert contrastive_loss(A_DUP, B_DUP, torch.tensor(1.0)).item() > got.item() + 0.1
    # ids all distinct: CLIP's arange labels, whatever the mode
    for mode in ("mask", "multi_positive"):
        assert contrastive_loss(A_DUP, B_DUP, torch.tensor(3.0), ids=torch.tensor([1, 2, 3]), duplicates=mode
                                ).item() == pytest.approx(contrastive_loss(A_DUP, B_DUP, torch.tensor(3.0)).item())


def test_identical_captions_multi_positive_hand_computed_and_equal_to_clip_for_identical_embeddings():
    # targets spread over the columns with the row's text
    a_to_b = (_lse(1, 0, 1) - 1) + (_lse(0, 1, 0) - 1) + (_lse(.6, .8, .6) - .6)
    b_to_a = 2 * (_lse(1, 0, .6) - (1 + .6) / 2) + (_lse(0, 1, .8) - 1)
    a, b = A_DUP.clone().requires_grad_(), B_DUP.clone().requires_grad_()
    got = contrastive_loss(a, b, torch.tensor(1.0), ids=IDS_DUP, duplicates="multi_positive")
    assert got.item() == pytest.approx((a_to_b + b_to_a) / 6, rel=1e-6)
    # identical texts have identical embeddings: CLIP's labels give the same value and the same gradient
    # once the two copies of the caption are one tensor (what a text tower makes of one token sequence)
    clip = contrastive_loss(A_DUP, B_DUP, torch.tensor(1.0))
    assert clip.item() == pytest.approx(got.item(), rel=1e-6)
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    grads = []
    for mode in ("multi_positive", "negatives"):
        (g,) = torch.autograd.grad(contrastive_loss(A_DUP, text[[0, 1, 0]], torch.tensor(1.0), ids=IDS_DUP,
                                                    duplicates=mode), text)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1])
    # with embeddings that differ within a text group, the two differ
    b_noisy = B_DUP + torch.tensor([[0.0, 0.1], [0.0, 0.0], [0.0, -0.1]])
    assert contrastive_loss(A_DUP, b_noisy, torch.tensor(1.0), ids=IDS_DUP, duplicates="multi_positive").item() != (
        pytest.approx(contrastive_loss(A_DUP, b_noisy, torch.tensor(1.0)).item()))


def test_text_ids_equal_exactly_for_equal_token_rows():
    tokens = torch.tensor([[49406, 320, 2368, 49407, 0], [49406, 320, 2368, 49407, 0], [49406, 2368, 320, 49407, 0],
                           [49406, 320, 2369, 49407, 0]])
    ids = text_ids(tokens)
    assert ids.dtype == torch.long and ids[0] == ids[1] and len(set(ids.tolist())) == 3
    assert torch.equal(text_ids(tokens[[3, 0]]), ids[[3, 0]])  # per row, order free


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


# ---- streamed (column-chunked) logsumexp == the whole (n, N) logits -------------------------------------------


def test_streamed_logsumexp_equals_logsumexp_in_value_and_gradients_with_and_without_mask():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 4, generator=g, requires_grad=True)
    columns = torch.randn(11, 4, generator=g, requires_grad=True)
    scale = torch.tensor(3.0, requires_grad=True)
    row_group, column_group = torch.tensor([0, 1, 2, 0, 3]), torch.tensor([0, 1, 2, 0, 3, 4, 0, 1, 5, 6, 7])
    own = torch.arange(5)
    masked = (row_group[:, None] == column_group[None, :]) & (own[:, None] != torch.arange(11)[None, :])
    weight = torch.randn(5, generator=g)  # a non-uniform upstream gradient
    for mask_args in ((), (row_group, column_group, own)):
        logits = scale * rows @ columns.T
        if mask_args:
            logits = logits.masked_fill(masked, -torch.inf)
        want = torch.logsumexp(logits, dim=1)
        want_grads = torch.autograd.grad((want * weight).sum(), (rows, columns, scale))
        for chunk in (1, 3, 4, 11, 50):
            got = streamed_logsumexp(rows, columns, scale, chunk, *mask_args)
            torch.testing.assert_close(got, want)
            for g_got, g_want in zip(torch.autograd.grad((got * weight).sum(), (rows, columns, scale)), want_grads):
                torch.testing.assert_close(g_got, g_want)
    with pytest.raises(ValueError, match="go together"):
        streamed_logsumexp(rows, columns, scale, 2, row_group)
    with pytest.raises(ValueError, match="chunk"):
        streamed_logsumexp(rows, columns, scale, 0)


@pytest.mark.parametrize("duplicates", ["negatives", "mask", "multi_positive", None])
def test_chunked_contrastive_sum_equals_unchunked_for_local_rows_in_value_and_gradients(duplicates):
    """A rank's local rows (offset 3 of N = 10) against gathered columns; ids repeat within and outside the rows.
    float64, so the two summation orders agree to ~1e-15 (float32: ~1e-6)."""
    g = torch.Generator().manual_seed(1)
    all_a = F.normalize(torch.randn(10, 6, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    all_b = F.normalize(torch.randn(10, 6, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    scale = torch.tensor(1 / 0.07, dtype=torch.float64, requires_grad=True)
    ids = None if duplicates is None else torch.tensor([4, 9, 4, 1, 2, 1, 4, 5, 6, 2])
    rows = slice(3, 7)

    def run(chunk):
        a, b = all_a[rows] * 1.0, all_b[rows] * 1.0  # the local rows, a separate path as after a gather
        total = contrastive_sum(a, b, all_a, all_b, rows.start, scale, ids, duplicates or "mask", chunk)
        return total, torch.autograd.grad(total, (all_a, all_b, scale))

    want, want_grads = run(None)
    for chunk in (1, 3, 9):
        got, grads = run(chunk)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for g_got, g_want in zip(grads, want_grads):
            torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)


def test_umg_loss_with_contrastive_chunk_equals_unchunked():
    torch.manual_seed(2)
    e = lambda n: F.normalize(torch.randn(n, 8), dim=-1)
    args = (e(4), e(4), e(9), e(9), e(3), torch.randint(0, 2, (4, 3)).float(), e(2),
            torch.randint(0, 2, (9, 2)).float(), torch.tensor(10.0))
    ids = dict(caption_ids=torch.tensor([1, 2, 1, 3]), region_caption_ids=torch.tensor([5, 5, 6, 7, 5, 8, 9, 6, 1]))
    want = UMGLoss()(*args, **ids)
    got = UMGLoss(contrastive_chunk=2)(*args, **ids)
    assert {k: v.item() for k, v in got.items()} == pytest.approx({k: v.item() for k, v in want.items()})
    with pytest.raises(ValueError, match="contrastive_chunk"):
        UMGLoss(contrastive_chunk=0)


# ---- distributed: 2 gloo ranks with b images each == 1 process with 2b images --------------------------------

REGION_SPLITS = [(3, 1), (2, 0), (0, 0)]  # regions on rank 0 / rank 1
# (region split, duplicate-caption mode with text ids repeated within and across ranks (None: no ids),
#  tag vocabulary shared and sliced over ranks,
#  contrastive_chunk of the ranks (the single-process reference runs unchunked))
CASES = [(split, None, False, None) for split in REGION_SPLITS] + [
    ((3, 1), "mask", True, None), ((3, 1), "multi_positive", False, None), ((2, 0), "mask", False, None),
    ((0, 0), "mask", True, None), ((3, 1), "mask", False, 1), ((3, 1), "multi_positive", True, 3),
    ((3, 1), None, False, 2)]
CAPTION_IDS = [7, 3, 7, 5]  # images 0 (rank 0) and 2 (rank 1) have the same caption
REGION_IDS = [1, 2, 1, 2]   # regions 0 and 2 (rank 0) and 1 and 3 (across ranks) share captions


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

        out = {
            "image_emb": img(batch["images"]), "caption_emb": txt(batch["captions"]),
            "region_emb": img(batch["regions"]), "region_caption_emb": txt(batch["region_captions"]),
            "image_tag_emb": txt(batch["tags"]), "image_tag_targets": batch["image_tag_targets"],
            "region_tag_emb": txt(batch["region_tags"]), "region_tag_targets": batch["region_tag_targets"],
            "logit_scale": self.logit_scale.exp(),
        }
        return {**out, **{k: batch[k] for k in ("caption_ids", "region_caption_ids") if k in batch}}


def _global_batch(regions: int, ids: bool = False, b: int = 2):
    g = torch.Generator().manual_seed(regions)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    out = {
        "images": r(2 * b, 6), "captions": r(2 * b, 5), "tags": r(3, 5),
        "regions": r(regions, 6), "region_captions": r(regions, 5),
        "image_tag_targets": (r(2 * b, 3) > 0).float(), "region_tag_targets": (r(regions, 2) > 0).float(),
    }
    out["region_tags"] = out["tags"][:2]
    if ids:
        out.update(caption_ids=torch.tensor(CAPTION_IDS), region_caption_ids=torch.tensor(REGION_IDS[:regions]))
    return out


def _rank_batch(split, rank: int, ids: bool, shared_tags: bool, b: int = 2):
    full = _global_batch(sum(split), ids, b)
    lo = sum(split[:rank])
    regions = slice(lo, lo + split[rank])
    images = slice(rank * b, (rank + 1) * b)
    per_image = ("images", "captions", "image_tag_targets", "caption_ids")
    per_region = ("regions", "region_captions", "region_tag_targets", "region_caption_ids")
    out = {"tags": full["tags"], "region_tags": full["region_tags"],
           **{k: full[k][images] for k in per_image if k in full},
           **{k: full[k][regions] for k in per_region if k in full}}
    if shared_tags:  # each rank encodes a contiguous slice of the vocabulary; targets keep the whole one
        out["tags"] = full["tags"].tensor_split(2)[rank]
        out["region_tags"] = full["region_tags"].tensor_split(2)[rank]
    return out


def _loss_and_grads(batch, shared_tags: bool = False, mode: str | None = None, chunk: int | None = None):
    towers = _Towers()
    losses = UMGLoss(duplicate_captions=mode or "negatives", shared_tag_vocab=shared_tags,
                     contrastive_chunk=chunk)(**towers(batch))
    total_loss(losses).backward()
    return {k: v.item() for k, v in losses.items()}, {n: p.grad.clone() for n, p in towers.named_parameters()}


def _worker(rank: int, world: int, init_file: str, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = []
        for split, ids, shared, chunk in CASES:
            losses, grads = _loss_and_grads(_rank_batch(split, rank, ids is not None, shared), shared, ids, chunk)
            for g in grads.values():  # what DDP does: average over ranks
                dist.all_reduce(g)
                g /= world
            results.append((losses, grads))
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_rank_local_loss_matches_single_process_loss_and_gradients(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "pg_init"), str(tmp_path)), nprocs=2, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for i, (split, ids, shared, chunk) in enumerate(CASES):
        losses, grads = _loss_and_grads(_global_batch(sum(split), ids is not None), mode=ids)
        for rank_results in per_rank:
            rank_losses, rank_grads = rank_results[i]
            assert rank_losses == pytest.approx(losses, rel=1e-5, abs=1e-7), (split, ids, shared, chunk)
            for name, g in grads.items():
                # chunked: another float32 summation order (float64 agrees to 1e-15: the tests above)
                torch.testing.assert_close(rank_grads[name], g, rtol=1e-5, atol=1e-6 if chunk is None else 1e-5,
                                           msg=f"{split} {ids} {chunk} {name}")
        assert all(math.isfinite(v) for v in losses.values())
        if ids is not None:  # the duplicates changed the loss: the ids reached both ranks' terms
            clip = _loss_and_grads(_global_batch(sum(split), True), mode="negatives")[0]
            assert clip["image_caption_loss"] != pytest.approx(losses["image_caption_loss"])
