"""Whether a build config can run in one process (``umg build``) or needs the Ray layout of the flow.

``umg build`` loads every model stage in its own process, in its own Python environment, on one device.
A config whose stages run in their own environments (``ray.resources.<stage>.runtime_env``: RAM and GPT4RoI
pin library versions the main environment cannot hold) or whose stages reserve more than one GPU in total
(``num_gpus`` x ``pool_size``: the models are sized to be spread over several GPUs) cannot work that way;
only the Prefect flow ``build-umg41m`` places each stage's actors where the config says.
"""

from __future__ import annotations

from data_schemas import BuildConfig

FLOW_HINT = ("run the Prefect flow build-umg41m instead (`python -m flows.serve` then `prefect deployment run "
             "build-umg41m/local`, or build-umg41m/cluster from prefect.yaml; docs/orchestration.md)")


def stage_layout(cfg: BuildConfig) -> tuple[list[str], float]:
    """``(stages with their own runtime_env, GPUs the model stages reserve in total)`` under ``cfg.ray``."""
    if cfg.annotate is None:
        return [], 0.0
    ray_cfg = cfg.ray
    if ray_cfg.mode == "chain":
        chain = ray_cfg.resources_for("chain", "chain")
        return (["chain"] if chain.runtime_env else []), chain.num_gpus * chain.pool_size
    own_env, gpus = [], 0.0
    for stage, (kind, _) in cfg.annotate.model_stages().items():
        resources = ray_cfg.resources_for(stage, kind)
        if resources.runtime_env:
            own_env.append(stage)
        gpus += resources.num_gpus * resources.pool_size
    return own_env, gpus


def in_process_refusal(cfg: BuildConfig) -> str | None:
    """Why ``cfg`` cannot be built in one process (one sentence naming the flow to use), or None when it can."""
    own_env, gpus = stage_layout(cfg)
    reasons = []
    if own_env:
        reasons.append(f"stages {', '.join(own_env)} run in their own environments (ray.resources.<stage>."
                       "runtime_env), which one process cannot load")
    if gpus > 1:
        reasons.append(f"its model stages reserve {gpus:g} GPUs (num_gpus x pool_size), which one process on one "
                       "device cannot hold")
    if not reasons:
        return None
    return f"umg build runs every model in this process, but {' and '.join(reasons)}: {FLOW_HINT}"
