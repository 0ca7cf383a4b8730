"""Resume: 2N steps in one run == N steps, stop, resume, N more (parameters, optimizer state, loss curve)."""

from __future__ import annotations

import csv

import pytest
import torch

from data_schemas import TrainConfig
from model.checkpoint import load_train_state, resolve_checkpoint
from model.factory import create_umg_clip, load_umg_checkpoint
from model.trainer import train
from pipeline.sample_shards import write_sample_shards

N = 3


@pytest.fixture(autouse=True)
def _deterministic_one_thread():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_sample_shards(out, n=30, seed=1, shard_size=8)  # train: 24 images in 3 shards
    return out / "train"


def _config(**extra) -> TrainConfig:
    # Shuffle on (seeded), 24 images / batch 8 = 3 batches per epoch: the run crosses an epoch after step N.
    return TrainConfig.model_validate({
        "steps": 2 * N, "batch_size": 8, "deterministic": True, "seed": 5, "save_every": 1, "keep_last": 10,
        "data": {"workers": 0, "shuffle_buffer": 10, "shuffle_initial": 4, "crop_scale": [0.6, 1.0]},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "visual_lr": 2e-3},
        "progress": False, "tensorboard": False, "plot": False, **extra})


def _weights(path) -> dict[str, torch.Tensor]:
    model = create_umg_clip("umg-tiny-vit")
    load_umg_checkpoint(model, path / "model.safetensors")
    return model.state_dict()


def _curve(run) -> list[tuple[str, ...]]:
    with open(run / "metrics.csv", newline="") as handle:
        return [(r["step"], r["epoch"], r["loss"], r["lr_visual"], r["logit_scale"]) for r in csv.DictReader(handle)]


def test_stop_and_resume_continues_the_same_run(shards, tmp_path):
    whole = train(_config(), shards, tmp_path / "whole")
    first = train(_config(run_steps=N), shards, tmp_path / "split")
    assert first.steps == N and whole.steps == 2 * N
    state = load_train_state(first.checkpoint)
    # Epoch 0 is used up, but its end is only seen when the next batch is asked for (after the resume).
    assert (state["step"], state["epoch"], state["data"]) == (N, 0, [{0: 24}])
    mid = load_train_state(resolve_checkpoint(tmp_path / "split" / "checkpoints" / "step_00000002"))
    assert mid["data"] == [{0: 16}] and mid["rng"][0]["torch"].dtype == torch.uint8
    second = train(_config(), shards, tmp_path / "split")
    assert second.steps == 2 * N

    a, b = _weights(whole.checkpoint), _weights(second.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["clip.visual.conv1.weight"], _weights(first.checkpoint)["clip.visual.conv1.weight"])
    opt_a, opt_b = (load_train_state(r.checkpoint)["optimizer"]["state"] for r in (whole, second))
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)
    assert _curve(tmp_path / "whole") == _curve(tmp_path / "split")
    assert [c[1] for c in _curve(tmp_path / "whole")] == ["0", "0", "0", "1", "1", "1"]
    assert whole.final_losses == second.final_losses


def test_resume_mid_epoch_from_an_older_checkpoint(shards, tmp_path):
    whole = train(_config(), shards, tmp_path / "whole")
    # Resume from step 2 (inside epoch 0, data position {worker 0: 16 samples}) into a fresh run dir.
    ckpt = resolve_checkpoint(tmp_path / "whole" / "checkpoints" / "step_00000002")
    again = train(_config(resume=str(ckpt)), shards, tmp_path / "again")
    a, b = _weights(whole.checkpoint), _weights(again.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r[0] for r in _curve(tmp_path / "again")] == ["3", "4", "5", "6"]
