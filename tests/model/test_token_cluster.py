import pytest
import torch

from model.factory import create_umg_clip
from model.token_cluster import (
    TokenClusterCfg,
    density_peak_cluster,
    grid_positions,
    merge_tokens,
    run_blocks_with_clustering,
    unfold_tokens,
)


def test_cfg_validation_and_kept_count():
    assert TokenClusterCfg(reduction=0.75).num_kept(64) == 16
    assert TokenClusterCfg(reduction=0.0).num_kept(64) == 64
    assert TokenClusterCfg(reduction=0.9).num_kept(3) == 1
    for bad in ({"reduction": 0.95}, {"reduction": -0.1}, {"layer": -1}, {"k_neighbors": 0}):
        with pytest.raises(ValueError):
            TokenClusterCfg(**bad)


def test_grid_positions_row_major_unit_range():
    pos = grid_positions((2, 3))
    assert pos.tolist() == [[0, 0], [0, 0.5], [0, 1], [1, 0], [1, 0.5], [1, 1]]


def test_cluster_shapes_centres_own_cluster_and_determinism():
    torch.manual_seed(0)
    tokens = torch.randn(3, 8 * 8, 16)
    a = density_peak_cluster(tokens, (8, 8), 16)
    b = density_peak_cluster(tokens.clone(), (8, 8), 16)
    assert a.center_idx.shape == (3, 16) and a.assign.shape == (3, 64)
    assert torch.equal(a.center_idx, b.center_idx) and torch.equal(a.assign, b.assign)
    assert torch.all(a.center_idx[:, 1:] > a.center_idx[:, :-1])  # sorted, distinct
    own = a.assign.gather(1, a.center_idx)
    assert torch.equal(own, torch.arange(16).expand(3, -1))
    for k in range(16):  # no empty cluster
        assert bool((a.assign == k).any(dim=1).all())


def test_cluster_groups_similar_and_nearby_tokens():
    # Left half of a 4x4 grid holds feature A, right half feature B: two clusters = the two halves.
    feat_a, feat_b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    grid = torch.stack([feat_a if x < 2 else feat_b for y in range(4) for x in range(4)])
    c = density_peak_cluster(grid[None], (4, 4), 2, spatial_weight=0.1)
    cols = torch.arange(16) % 4
    assert torch.equal(c.assign[0], (cols >= 2).long()) or torch.equal(c.assign[0], (cols < 2).long())
    # Identical features, separated only by position: spatial term splits top from bottom or left from right.
    same = torch.ones(1, 16, 4)
    c = density_peak_cluster(same, (4, 4), 2, spatial_weight=1.0)
    sizes = torch.bincount(c.assign[0], minlength=2)
    assert sizes.min() >= 4


def test_merge_is_weighted_mean_and_unfold_restores_constant_clusters():
    tokens = torch.tensor([[[1.0], [3.0], [10.0], [20.0]]])
    assign = torch.tensor([[0, 0, 1, 1]])
    reps = merge_tokens(tokens, assign, 2)
    assert reps.squeeze().tolist() == [2.0, 15.0]
    weighted = merge_tokens(tokens, assign, 2, weights=torch.tensor([[1.0, 3.0, 1.0, 0.0]]))
    assert weighted.squeeze().tolist() == [2.5, 10.0]
    assert unfold_tokens(reps, assign).squeeze().tolist() == [2.0, 2.0, 15.0, 15.0]
    # Tokens already constant per cluster come back (up to the rounding of sum / count).
    const = torch.randn(2, 3, 5)
    assign = torch.randint(0, 3, (2, 12))
    assign[:, :3] = torch.arange(3)
    expanded = unfold_tokens(const, assign)
    torch.testing.assert_close(unfold_tokens(merge_tokens(expanded, assign, 3), assign), expanded,
                               rtol=1e-6, atol=1e-6)


def test_runner_counts_and_zero_reduction_is_plain():
    seen = []

    def block(x, centers):
        seen.append((x.shape[1], None if centers is None else tuple(centers.shape)))
        return x * 2.0

    x = torch.randn(2, 1 + 16, 8)
    out, lens = run_blocks_with_clustering([block] * 3, x, 1, (4, 4), TokenClusterCfg(reduction=0.75, layer=1))
    assert lens == [17, 5, 5] and out.shape == x.shape
    assert seen[1:] == [(5, (2, 4)), (5, (2, 4))]
    out0, lens0 = run_blocks_with_clustering([block] * 3, x, 1, (4, 4), TokenClusterCfg(reduction=0.0, layer=1))
    assert lens0 == [17, 17, 17] and torch.equal(out0, x * 8.0)
    with pytest.raises(ValueError, match="exceeds"):
        run_blocks_with_clustering([block], x, 1, (4, 4), TokenClusterCfg(reduction=0.5, layer=2))


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = create_umg_clip("umg-tiny-vit").eval()
    model.cluster_in_eval = True  # these tests exercise clustering itself (off in eval() by default)
    return model


def test_zero_reduction_reproduces_plain_model_bit_for_bit(vit):
    images = torch.randn(2, 3, 128, 128)
    vit.cluster = None
    plain_emb, plain_grid = vit.encode_image(images)
    vit.cluster = TokenClusterCfg(reduction=0.0, layer=1)
    emb, grid = vit.encode_image(images)
    assert torch.equal(emb, plain_emb) and torch.equal(grid, plain_grid)


def test_75_percent_reduction_later_blocks_see_quarter_of_tokens(vit):
    vit.cluster = TokenClusterCfg(reduction=0.75, layer=1)
    seen = []
    hooks = [blk.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
             for blk in vit.clip.visual.transformer.resblocks]
    try:
        emb, grid = vit.encode_image(torch.randn(2, 3, 128, 128))
    finally:
        for h in hooks:
            h.remove()
    assert seen == [1 + 64, 1 + 16] == vit.tokens.last_block_tokens
    assert emb.shape == (2, 64) and grid.shape == (2, 8, 8, 64)
    # Unfolded grid: exactly 16 distinct token vectors per image, one per representative.
    assert all(len(torch.unique(g.reshape(64, -1), dim=0)) == 16 for g in grid)


def test_clustered_forward_is_deterministic_and_gradients_flow(vit):
    vit.cluster = TokenClusterCfg(reduction=0.75, layer=1)
    images = torch.randn(2, 3, 128, 128)
    vit.zero_grad()
    emb, grid = vit.encode_image(images)
    emb2, grid2 = vit.encode_image(images)
    assert torch.equal(emb, emb2) and torch.equal(grid, grid2)
    (emb.sum() + vit.tokens.head(grid).pow(2).sum()).backward()
    v = vit.clip.visual
    for p in (v.conv1.weight, v.transformer.resblocks[0].mlp.c_fc.weight, v.transformer.resblocks[1].mlp.c_fc.weight,
              v.proj):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_eva_tower_clusters_with_rope():
    torch.manual_seed(0)
    model = create_umg_clip("umg-tiny-eva", cluster=TokenClusterCfg(reduction=0.75, layer=6)).eval()
    model.cluster_in_eval = True
    images = torch.randn(2, 3, 112, 112)
    emb, grid = model.encode_image(images)
    assert model.tokens.last_block_tokens == [65] * 6 + [17] * 6
    assert emb.shape == (2, 64) and grid.shape == (2, 8, 8, 192) and torch.isfinite(grid).all()
    emb.sum().backward()
    assert model.clip.visual.trunk.blocks[-1].mlp.fc1.weight.grad.abs().sum() > 0
    model.cluster = TokenClusterCfg(reduction=0.0, layer=6)
    with torch.no_grad():
        plain = torch.nn.functional.normalize(model.clip.visual(images), dim=-1)
        assert torch.equal(model.encode_image(images)[0], plain)


def test_eva_representatives_get_their_centre_rope_position(monkeypatch):
    import model.token_cluster as token_cluster

    torch.manual_seed(0)
    layer = 4
    model = create_umg_clip("umg-tiny-eva", cluster=TokenClusterCfg(reduction=0.75, layer=layer))  # train(): clusters
    trunk = model.clip.visual.trunk
    clusters, ropes = [], {}
    cluster = token_cluster.density_peak_cluster
    monkeypatch.setattr(token_cluster, "density_peak_cluster", lambda *a, **k: clusters.append(cluster(*a, **k))
                        or clusters[-1])
    for i, block in enumerate(trunk.blocks):
        block.register_forward_pre_hook(lambda _m, _args, kwargs, i=i: ropes.__setitem__(i, kwargs["rope"]),
                                        with_kwargs=True)
    with torch.no_grad():
        model.encode_image(torch.randn(2, 3, 112, 112))
    table = trunk.rope.get_embed()  # (64, dim): the rotary embedding of every grid position, row-major
    (centres, assign), = clusters
    assert centres.shape == (2, 16) and not torch.equal(centres[0], centres[1])  # different per image
    for i in range(layer):
        assert torch.equal(ropes[i], table)  # all tokens, their own positions
    for i in range(layer, len(trunk.blocks)):
        # (B, 1, K, dim): representative k of image b rotates as the grid position of its centre token
        assert ropes[i].shape == (2, 1, 16, table.shape[-1])
        for b in range(2):
            assert torch.equal(ropes[i][b, 0], table[centres[b]])
    # the centre is a member of its own cluster, so the position is one of the merged tokens'
    assert torch.equal(assign.gather(1, centres), torch.arange(16).expand(2, -1))
