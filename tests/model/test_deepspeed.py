"""DeepSpeed ZeRO-1 on CPU in one process: the engine step equals ours (AdamW); LAMB trains, saves, resumes."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist

from data_schemas import TrainConfig
from model.checkpoint import load_checkpoint
from model.launch import free_port, init_distributed
from model.trainer import Trainer, resolve_tars, train
from pipeline.sample_shards import write_sample_shards

deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is an extra: pip install -e '.[deepspeed]'")


@pytest.fixture(scope="module", autouse=True)
def _one_process_group():
    """DeepSpeed needs a process group: a 1-rank gloo group on a free port, gone after this module."""
    env = os.environ
    saved = {k: env.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if dist.is_initialized():
        dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_sample_shards(out, n=12, seed=4, shard_size=16)
    return resolve_tars(out / "train")


def _config(**extra) -> TrainConfig:
    return TrainConfig.model_validate({
        "batch_size": 4, "steps": 3, "seed": 1, "data": {"workers": 0, "shuffle": False},
        "optim": {"lr": 1e-3, "grad_clip_norm": 1.0}, "progress": False, "tensorboard": False, "plot": False,
        **extra})


def _trainer(cfg: TrainConfig, tars, out) -> Trainer:
    try:
        ctx = init_distributed(cfg.distributed, "cpu", need_group=cfg.deepspeed.enabled)
        return Trainer(cfg, tars, out, ctx)
    except (ImportError, OSError) as exc:  # e.g. DeepSpeed's CPU comm op cannot be JIT-built here
        pytest.skip(f"DeepSpeed engine could not be built on this machine: {exc}")


def test_zero1_step_equals_the_plain_step_for_an_elementwise_optimizer(tars, tmp_path):
    adamw = {"optim": {"name": "adamw", "lr": 1e-3, "grad_clip_norm": 1.0}}
    plain = _trainer(_config(**adamw), tars, tmp_path / "plain")
    zero = _trainer(_config(**adamw, deepspeed={"enabled": True, "zero_stage": 1}), tars, tmp_path / "zero")
    assert type(zero.engine).__name__ == "DeepSpeedEngine" and zero.engine.zero_optimization_stage() == 1
    batch = next(plain.batches())
    got, want = zero.train_step([batch]), plain.train_step([batch])
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    for (name, a), b in zip(plain.model.named_parameters(), zero.model.parameters()):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-6, msg=name)
    assert zero.scheduler.last_epoch == 1 and zero.optimizer.param_groups[0]["lr"] == plain.optimizer.param_groups[0]["lr"]


def test_zero1_with_lamb_trains_checkpoints_and_resumes(tars, tmp_path):
    cfg = _config(deepspeed={"enabled": True, "zero_stage": 1})
    _trainer(cfg, tars, tmp_path / "probe")  # skips the test where no engine can be built
    first = train(cfg.model_copy(update={"run_steps": 2}), tars, tmp_path / "run")
    assert first.steps == 2 and (first.checkpoint / "deepspeed" / "state").is_dir()
    done = train(cfg, tars, tmp_path / "run")
    assert done.steps == 3 and all(math.isfinite(v) for v in done.final_losses.values())
    before, after = load_checkpoint(first.checkpoint), load_checkpoint(done.checkpoint)
    assert not torch.equal(before.clip.visual.conv1.weight, after.clip.visual.conv1.weight)


def test_zero1_flattens_groups_so_lamb_trust_ratios_differ_from_per_tensor_lamb(tars, tmp_path):
    """Documents the caveat in docs/training.md: ZeRO steps LAMB on one flat partition per group."""
    plain = _trainer(_config(), tars, tmp_path / "plain")
    zero = _trainer(_config(deepspeed={"enabled": True, "zero_stage": 1}), tars, tmp_path / "zero")
    batch = next(plain.batches())
    zero.train_step([batch]), plain.train_step([batch])
    diff = max((a - b).abs().max().item() for a, b in zip(plain.model.parameters(), zero.model.parameters()))
    assert diff > 1e-5


def test_zero1_with_deepspeed_lamb_is_fused_lamb_on_each_flat_group_partition(tars, tmp_path):
    """``optim.lamb: deepspeed`` under ZeRO-1 = EVA-CLIP's setup: FusedLamb's math on each group's flat partition
    (one rank: the whole group flattened), i.e. one trust ratio per group, not per tensor."""
    from model.lamb import deepspeed_hyper, deepspeed_lamb_update_

    optim = {"lr": 1e-2, "grad_clip_norm": 1.0, "lamb": "deepspeed"}
    plain = _trainer(_config(optim=optim), tars, tmp_path / "plain")
    zero = _trainer(_config(optim=optim, deepspeed={"enabled": True, "zero_stage": 1}), tars, tmp_path / "zero")
    before = [p.detach().clone() for p in plain.model.parameters()]
    index = {id(p): i for i, p in enumerate(plain.model.parameters())}
    lrs = [group["lr"] for group in plain.optimizer.param_groups]  # the scheduler moves them after the step
    batch = next(plain.batches())
    plain.train_step([batch]), zero.train_step([batch])  # plain's clipped gradients stay in .grad
    after = list(zero.model.parameters())
    for lr, group in zip(lrs, plain.optimizer.param_groups):
        ids = [index[id(p)] for p in group["params"]]
        flat = torch.cat([before[i].reshape(-1) for i in ids])
        grad = torch.cat([p.grad.reshape(-1) for p in group["params"]])
        hyper = torch.tensor(deepspeed_hyper(lr, group["weight_decay"], group["betas"], group["eps"], 1,
                                             True, group["trust_range"]))
        deepspeed_lamb_update_(flat, grad, torch.zeros_like(flat), torch.zeros_like(flat), hyper,
                               eps_inside_sqrt=False)
        got = torch.cat([after[i].detach().reshape(-1) for i in ids])
        torch.testing.assert_close(got, flat, rtol=1e-4, atol=1e-6, msg=lambda m: f"{group['name']}: {m}")
        per_tensor = torch.cat([p.detach().reshape(-1) for p in group["params"]])  # plain: one ratio per tensor
        if len(ids) > 1:
            assert (per_tensor - flat).abs().max() > 1e-5, group["name"]
