"""Peak memory of one rank's contrastive term: the region term at the paper's shape, chunked vs unchunked.

Simulates rank 0 of ``--ranks`` W ranks at a global batch of ``--n`` N rows (regions) with ``--dim`` E:
the gathered (N, E) embeddings are leaf tensors that take gradients (what ``model.gather`` hands the loss),
this rank owns n = N / W of the rows. Forward and backward of one symmetric InfoNCE term:

- ``global`` (only with ``--global``): what ``model.losses`` did before issue 11 (and open_clip's
  ``local_loss=False``): the (N, N) logits on every rank, cross-entropy over rows and over columns
  (``logits.T``), labels ``arange(N)``;
- ``local``: ``model.losses.contrastive_sum`` unchunked: (n, N) logits in each direction, labels offset by
  the rank's prefix sum, with caption ids that repeat (``--duplicate-every``), so the ``mask`` path of
  identical captions (an (n, N) bool mask) is included;
- ``chunked``: the same call with ``chunk=--chunk`` (``loss.contrastive_chunk``): each direction's
  logsumexp streamed over column chunks (``model.streamed_logsumexp``), same value and gradients.

The defaults are the paper's region term with every size scaled by 1/4: 256 images per GPU x up to 20 regions
x 32 GPUs is 5,120 local rows x 163,840 regions (3.1 GiB per fp32 (n, N) matrix) at E = 512 (B/16); here
n = 1,280 x N = 40,960 (W = 32) at E = 128, so logits : embedding gradients keep the paper's proportion, and
``--chunk 2048`` is the config default 8,192 scaled the same way.

Each arm runs in a fresh subprocess (``benchmarks/peak_memory.py``: peak RSS on CPU, allocator peak on
CUDA) after a warm-up call; the arms' losses and gradients are checked against each other on a small
problem first. Prints the peaks (and global / local with ``--global``), then the ratio unchunked / chunked
last.

    .venv/bin/python benchmarks/contrastive_memory.py [--n 40960] [--ranks 32] [--dim 128] [--chunk 2048]
    .venv/bin/python benchmarks/contrastive_memory.py --n 16384 --dim 512 --global   # issue 11's comparison too
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from peak_memory import ENV, peak_mib  # benchmarks/peak_memory.py (this script's directory)


def _inputs(n: int, dim: int, duplicate_every: int, device: str):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    all_a = F.normalize(torch.randn(n, dim, generator=g), dim=-1).to(device).requires_grad_()
    all_b = F.normalize(torch.randn(n, dim, generator=g), dim=-1).to(device).requires_grad_()
    ids = torch.arange(n, device=device)
    ids[::duplicate_every] = 0  # every k-th caption is the same text
    return all_a, all_b, ids, torch.tensor(1 / 0.07, device=device)


def global_loss(all_a, all_b, logit_scale):
    """The global-matrix term (every rank the same): mean over N rows of (CE(a->b) + CE(b->a)) / 2."""
    import torch
    import torch.nn.functional as F

    logits = logit_scale * all_a @ all_b.T
    labels = torch.arange(all_a.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def local_loss(all_a, all_b, ids, logit_scale, rank: int, ranks: int, duplicates: str = "mask",
               chunk: int | None = None):
    """Rank ``rank``'s share of the same term (local rows, global columns, offset labels; ``chunk``: streamed)."""
    from model.losses import contrastive_sum

    n = all_a.shape[0]
    rows = slice(rank * n // ranks, (rank + 1) * n // ranks)
    total = contrastive_sum(all_a[rows], all_b[rows], all_a, all_b, rows.start, logit_scale, ids, duplicates, chunk)
    return total / (2 * n)


def _check() -> None:
    """On a small problem: the ranks' local terms sum to the global term (no duplicates), and the chunked local
    term equals the unchunked one (with duplicates), in value and gradient."""
    import torch

    all_a, all_b, ids, scale = _inputs(96, 16, 10, "cpu")
    distinct = torch.arange(96)
    reference = global_loss(all_a, all_b, scale)
    ref_grads = torch.autograd.grad(reference, (all_a, all_b))
    parts = sum(local_loss(all_a, all_b, distinct, scale, r, 4) for r in range(4))
    grads = torch.autograd.grad(parts, (all_a, all_b))
    torch.testing.assert_close(parts, reference)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
    unchunked = local_loss(all_a, all_b, ids, scale, 1, 4)
    chunked = local_loss(all_a, all_b, ids, scale, 1, 4, chunk=7)
    torch.testing.assert_close(chunked, unchunked)
    for got, want in zip(torch.autograd.grad(chunked, (all_a, all_b)), torch.autograd.grad(unchunked, (all_a, all_b))):
        torch.testing.assert_close(got, want)


def _measure(opts: argparse.Namespace) -> dict:
    import gc

    import torch

    torch.set_num_threads(opts.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    all_a, all_b, ids, scale = _inputs(opts.n, opts.dim, opts.duplicate_every, device)

    def step():
        if opts.arm == "global":
            loss = global_loss(all_a, all_b, scale)
        else:
            loss = local_loss(all_a, all_b, ids, scale, 0, opts.ranks,
                              chunk=opts.chunk if opts.arm == "chunked" else None)
        loss.backward()
        all_a.grad = all_b.grad = None

    step()  # warm-up
    gc.collect()
    return {"peak_mib": peak_mib(step, device), "device": device}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=40960, help="global rows N (regions of the global batch)")
    parser.add_argument("--ranks", type=int, default=32, help="W ranks; this rank holds N / W rows")
    parser.add_argument("--dim", type=int, default=128, help="embedding width E")
    parser.add_argument("--chunk", type=int, default=2048, help="columns per chunk of the chunked arm")
    parser.add_argument("--global", dest="with_global", action="store_true",
                        help="also measure the global (N x N) term (N x N fp32 must fit)")
    parser.add_argument("--duplicate-every", type=int, default=10, help="every k-th caption is one shared text")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arm", choices=["global", "local", "chunked"], help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.arm:
        print(json.dumps(_measure(opts)))
        return
    _check()
    env = {**os.environ, **ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    results = {}
    for arm in ("chunked", "local") + (("global",) if opts.with_global else ()):
        cmd = [sys.executable, __file__, "--arm", arm, "--n", str(opts.n), "--ranks", str(opts.ranks),
               "--dim", str(opts.dim), "--duplicate-every", str(opts.duplicate_every), "--threads", str(opts.threads),
               "--chunk", str(opts.chunk)]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        results[arm] = json.loads(out.strip().splitlines()[-1])
    n_local = opts.n // opts.ranks
    print(f"device {results['local']['device']}, N = {opts.n} global rows, W = {opts.ranks} ranks "
          f"(n = {n_local} local rows), E = {opts.dim}; ids with every {opts.duplicate_every}th caption shared "
          "(mask path)")
    if opts.with_global:
        print(f"global  (N x N logits):          peak {results['global']['peak_mib']:9.1f} MiB "
              f"(one N x N fp32 matrix: {opts.n * opts.n * 4 / 2**20:.0f} MiB)")
    print(f"local   (n x N logits):          peak {results['local']['peak_mib']:9.1f} MiB "
          f"(one n x N fp32 matrix: {n_local * opts.n * 4 / 2**20:.0f} MiB)")
    print(f"chunked (n x {opts.chunk} per chunk): peak {results['chunked']['peak_mib']:9.1f} MiB "
          f"(one n x chunk fp32 matrix: {n_local * opts.chunk * 4 / 2**20:.0f} MiB)")
    if opts.with_global:
        print(f"peak memory ratio global / local: {results['global']['peak_mib'] / results['local']['peak_mib']:.1f}")
    print(f"peak memory ratio unchunked / chunked: {results['local']['peak_mib'] / results['chunked']['peak_mib']:.1f}")


if __name__ == "__main__":
    main()
