"""Process groups, DeepSpeed engines and the Ray Train launcher of the trainer.

- torchrun (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT``): :func:`init_distributed` initialises the default group from the environment
  (``env://``), nccl on CUDA and gloo on CPU. A plain ``python``/``umg train`` is world size 1 and
  creates no group, unless DeepSpeed needs one (then a one-process gloo/nccl group on a free port).
  A group that already exists (Ray Train, tests) is used as it is.
- DeepSpeed: :func:`deepspeed_engine` wraps the model and the client optimizer (LAMB) in an engine
  with ZeRO stage ``deepspeed.zero_stage``. Autocast stays ours (fp32 master weights, bf16 compute).
- Ray Train: :func:`run_with_ray` runs the trainer's single-rank entry (passed in) in ``ray_num_workers``
  ``TorchTrainer`` workers on a local Ray bound to 127.0.0.1 (``ray_runtime``; or a cluster at
  ``ray_address``); Ray creates the process group. This module never imports ``model.trainer``.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import ray_runtime
from data_schemas.train_config import DistributedSection, TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank, world size, local rank, its device, and whether it made the group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1 or (dist.is_available() and dist.is_initialized()):
            dist.barrier()


def free_port() -> int:
    """A currently free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _device(preference: str, local_rank: int) -> torch.device:
    if preference != "auto":
        return torch.device(preference)
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(section: DistributedSection, device: str = "auto", need_group: bool = False) -> DistContext:
    """Join (or create) the default process group as the environment says.

    Args:
        section: backend and timeout.
        device: ``auto`` or an explicit torch device string.
        need_group: create a one-process group when none is launched (DeepSpeed needs one).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        ctx_device = _device(device, local_rank)
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, ctx_device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ctx_device = _device(device, local_rank)
    if world == 1 and not need_group:
        return DistContext(0, 1, 0, ctx_device)
    if world == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
    backend = section.backend
    if backend == "auto":
        backend = "nccl" if ctx_device.type == "cuda" else "gloo"
    if ctx_device.type == "cuda":
        torch.cuda.set_device(ctx_device)
    dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=section.timeout_s))
    log.info("process group: rank %d / %d, backend %s, device %s", dist.get_rank(), world, backend, ctx_device)
    # A one-process group made for DeepSpeed stays for the process: DeepSpeed caches its groups, and a
    # second engine in the same process (resume, tests) fails on a destroyed, re-created group.
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, ctx_device, owns_group=world > 1)


def cleanup(ctx: DistContext) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed config of a run: micro batch, accumulation, clipping, ZeRO stage, + ``deepspeed.config``.

    ``zero_allow_untested_optimizer``: ZeRO flattens each parameter group into one partition per rank
    and steps the client optimizer on those, which is exact for element-wise optimizers (AdamW) but
    makes LAMB's trust ratio per (group, partition) instead of per tensor (docs/training.md).
    """
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    base = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.optim.accum_steps,
        "gradient_clipping": cfg.optim.grad_clip_norm or 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _merge(base, ds.config)


def deepspeed_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    """``deepspeed.initialize`` with our client optimizer; returns the engine."""
    try:
        import deepspeed
    except ImportError as exc:
        raise RuntimeError("deepspeed.enabled needs DeepSpeed: pip install -e '.[deepspeed]'") from exc
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._broadcast_model
    DeepSpeedEngine._broadcast_model = _broadcast_model_scalar_safe
    try:
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg),
                                          dist_init_required=False)
    finally:
        DeepSpeedEngine._broadcast_model = original
    return engine


def _broadcast_model_scalar_safe(engine) -> None:
    """Rank 0's parameters to every rank, as ``DeepSpeedEngine._broadcast_model`` does for plain data parallel.

    DeepSpeed 0.19.8 broadcasts ``p.data.view(torch.uint8)``, which raises for 0-dim parameters such as
    open_clip's ``logit_scale`` ("self.dim() cannot be 0 to view Float as Byte"); a 0-dim tensor is sent
    through a 1-element view of the same storage instead. (MoE / sequence-parallel groups are not used here.)
    """
    if dist.get_world_size() == 1:
        return
    for param in engine.module.parameters():
        data = param.data.reshape(1) if param.data.dim() == 0 else param.data
        dist.broadcast(data, src=0)


#: "0" selects Ray Train v1, whose Result has no return value and whose trainer actor wants a CPU of its own.
RAY_TRAIN_V2_ENV = "RAY_TRAIN_V2_ENABLED"
#: What one rank runs: ``(cfg, shard tars, out_dir) -> JSON-able summary`` (``model.trainer.train_rank``).
RankFn = Callable[[TrainConfig, list[Path], Path], dict]


def start_ray_for_training(section: DistributedSection) -> bool:
    """Join the cluster at ``ray_address`` / ``$UMG_RAY_ADDRESS`` / ``$RAY_ADDRESS``, else start a local Ray
    bound to 127.0.0.1 (``ray_runtime``). Returns True when this call initialised Ray (the caller then owns
    ``ray.shutdown()``).

    The local runtime gets at least ``ray_num_workers * ray_cpus_per_worker`` logical CPUs (oversubscribing a
    small machine, as ``torchrun --nproc-per-node`` would) and its dashboard, on 127.0.0.1: Ray Train's controller
    watches itself through the State API the dashboard serves, and warns every few seconds without it.
    """
    num_cpus = max(os.cpu_count() or 1, math.ceil(section.ray_num_workers * section.ray_cpus_per_worker))
    owns = ray_runtime.start_ray(section.ray_address, include_dashboard=True, num_cpus=num_cpus, log_to_driver=True)
    if owns and not ray_runtime.cluster_address(section.ray_address):
        log.info("started a local Ray on 127.0.0.1 (%d CPUs)", num_cpus)
    return owns


def run_with_ray(cfg: TrainConfig, tars: list[Path], out_dir: Path, rank_fn: RankFn) -> dict:
    """Run ``rank_fn`` on ``ray_num_workers`` Ray Train workers (each one rank); returns rank 0's summary.

    ``rank_fn`` is the trainer's single-rank entry (``model.trainer.train_rank``), passed in so this module
    does not import the trainer (which imports this one); Ray ships it to the workers by reference.

    Ray is started here (loopback only) or joined (:func:`start_ray_for_training`) and shut down again if this
    call started it. ``out_dir`` and the shards must be reachable from every worker (a shared filesystem on a
    cluster); workers run in the driver's working directory when it exists on their node, so relative paths
    in the config mean what they mean to the driver.

    Raises:
        RuntimeError: when Ray Train is not installed (``pip install 'ray[train]'``), or when the run fails
            (the message carries the worker's error).
    """
    try:
        import ray
        import ray.train
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError as exc:
        raise RuntimeError(
            f"distributed.launcher 'ray' needs Ray Train, which is not importable here ({exc}); install it with "
            "pip install 'ray[train]==2.60.0', or launch with torchrun (docs/training.md)") from exc
    if os.environ.get(RAY_TRAIN_V2_ENV, "1").strip().lower() in ("0", "false"):
        raise RuntimeError(f"distributed.launcher 'ray' runs on Ray Train v2 (the default); unset {RAY_TRAIN_V2_ENV}")
    section = cfg.distributed
    out_dir = Path(out_dir).resolve()
    storage = Path(section.ray_storage_path or out_dir / "ray").resolve()
    owns_ray = start_ray_for_training(section)
    try:
        use_gpu = section.ray_use_gpu
        if use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        worker_cfg = cfg.model_copy(update={"distributed": section.model_copy(update={"launcher": "torchrun"})})
        backend = section.backend if section.backend != "auto" else ("nccl" if use_gpu else "gloo")
        trainer = TorchTrainer(
            partial(_ray_worker_loop, rank_fn=rank_fn),
            train_loop_config={"config": worker_cfg.model_dump(mode="json"), "cwd": os.getcwd(),
                               "shards": [str(Path(t).resolve()) for t in tars], "out_dir": str(out_dir)},
            torch_config=TorchConfig(backend=backend, timeout_s=section.timeout_s),
            scaling_config=ScalingConfig(num_workers=section.ray_num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": section.ray_cpus_per_worker}),
            run_config=RunConfig(name="umg-train", storage_path=str(storage)),
        )
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as exc:
            raise RuntimeError(f"Ray Train run failed: {exc}") from exc
    finally:
        if owns_ray:
            ray.shutdown()
    return result.return_value  # rank 0's


def _ray_worker_loop(config: dict, rank_fn: RankFn) -> dict:
    """One Ray Train worker: the process group exists already; run the ordinary trainer."""
    from ray.train.torch import get_device

    if Path(config["cwd"]).is_dir():  # Ray Train starts workers in its own run directory
        os.chdir(config["cwd"])
    cfg = TrainConfig.model_validate(config["config"])
    cfg = cfg.model_copy(update={"device": str(get_device())})
    # Ray Train v2 hands rank 0's return value to the driver (Result.return_value); no ray.train.report needed.
    return rank_fn(cfg, [Path(s) for s in config["shards"]], Path(config["out_dir"]))
