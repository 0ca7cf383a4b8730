"""The trainer's DDP path: 2 gloo ranks x batch b == 1 process x batch 2b, for one full trainer step."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from data_schemas import TrainConfig
from model.checkpoint import load_train_state, resolve_checkpoint
from model.data import make_dataset
from model.launch import DistContext, cleanup, free_port, init_distributed
from model.trainer import Trainer, resolve_tars
from pipeline.sample_shards import write_sample_shards

B = 4


def _config() -> TrainConfig:
    return TrainConfig.model_validate({
        "batch_size": B, "steps": 10, "seed": 3, "optim": {"lr": 1e-3, "visual_lr": 2e-3, "grad_clip_norm": 1.0},
        "data": {"workers": 0, "shuffle": False}, "progress": False, "tensorboard": False, "plot": False})


def _snapshot(trainer: Trainer, metrics: dict) -> dict:
    return {"metrics": metrics,
            "grads": {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()},
            "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()}}


def _rank(rank: int, world: int, port: int, batches: list, tars: list, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = _config()
    ctx = init_distributed(cfg.distributed, "cpu")
    try:
        trainer = Trainer(cfg, tars, f"{out}/run{rank}", ctx)
        assert isinstance(trainer.forward_model, DistributedDataParallel)
        metrics = trainer.train_step([batches[rank]])
        torch.save(_snapshot(trainer, metrics), f"{out}/rank{rank}.pt")
        # The whole loop on 2 ranks: rank agreement on epochs, gathered data positions and RNG states.
        loop_cfg = cfg.model_copy(update={"steps": 3, "data": cfg.data.model_copy(update={"resampled": True})})
        result = Trainer(loop_cfg, tars, f"{out}/loop", ctx).fit()
        torch.save(result.final_losses, f"{out}/loop{rank}.pt")
    finally:
        cleanup(ctx)


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_sample_shards(out, n=12, seed=2, shard_size=16)
    return resolve_tars(out / "train")


def test_two_gloo_ranks_match_one_process_with_the_double_batch(tars, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = Trainer(_config(), tars, tmp_path / "single", DistContext(0, 1, 0, torch.device("cpu")))
        # The same 2b images: the first two b-batches of the stream, and its first 2b-batch.
        small = make_dataset(tars, single.cfg.data, single.spec, single.tokens, B)
        halves = [batch for batch, _ in zip(small, range(2))]
        double = next(iter(make_dataset(tars, single.cfg.data, single.spec, single.tokens, 2 * B)))
        assert [k for h in halves for k in h.keys] == double.keys
        assert set(halves[0].image_tags[0]) and halves[0].image_tag_tokens.shape != double.image_tag_tokens.shape
        reference = _snapshot(single, single.train_step([double]))
    finally:
        torch.set_num_threads(threads)

    mp.spawn(_rank, args=(2, free_port(), halves, tars, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for got in ranks:
        for key in ("loss", "image_caption_loss", "region_caption_loss", "image_tag_loss", "region_tag_loss",
                    "grad_norm"):
            assert got["metrics"][key] == pytest.approx(reference["metrics"][key], rel=1e-5, abs=1e-7), key
        for name, grad in reference["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=name)
        for name, param in reference["params"].items():
            torch.testing.assert_close(got["params"][name], param, rtol=1e-5, atol=1e-6, msg=name)
    assert reference["metrics"]["region_caption_loss"] > 0 and reference["metrics"]["image_tag_loss"] > 0
    finals = [torch.load(tmp_path / f"loop{r}.pt") for r in range(2)]
    assert finals[0] == finals[1] and set(finals[0]) >= {"loss", "region_tag_loss"}
    state = load_train_state(resolve_checkpoint(tmp_path / "loop"))
    assert state["step"] == 3 and state["world_size"] == 2 and len(state["rng"]) == len(state["data"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # per-rank streams
