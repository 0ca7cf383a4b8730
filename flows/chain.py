"""The event chain build -> train -> adapt -> evaluate (DESIGN "Orchestration"): event names, the event each
flow emits as its last step, and the deployment triggers that start the next flow on it.

Each finished step emits one custom event whose payload carries what the next step needs (the build's shard
directory, the trained checkpoint, the adapted checkpoint) and ``upstream`` (``prefect.flow-run.<id>`` of the
emitting run). A deployment trigger on that event starts the next deployment as its own flow run, passing the
payload fields as parameters; everything else (config, output dir, evaluation task and data) is the triggered
deployment's own parameters. The same triggers are declared in ``prefect.yaml`` for a cluster
(``tests/flows/test_prefect_yaml.py`` checks that both agree).

    build-umg41m --umg.build.completed--> train --umg.train.completed--> adapt --umg.adapt.completed--> evaluate
"""

from __future__ import annotations

from typing import Any

from prefect.events import DeploymentEventTrigger, emit_event
from prefect.runtime import flow_run

BUILD_COMPLETED = "umg.build.completed"
TRAIN_COMPLETED = "umg.train.completed"
ADAPT_COMPLETED = "umg.adapt.completed"

#: event -> (its resource id prefix, the payload fields the next deployment gets as parameters)
LINKS: dict[str, tuple[str, tuple[str, ...]]] = {
    BUILD_COMPLETED: ("umg.build", ("shards", "upstream")),
    TRAIN_COMPLETED: ("umg.train", ("checkpoint", "shards", "upstream")),
    ADAPT_COMPLETED: ("umg.adapt", ("checkpoint", "upstream")),
}


def announce(event: str, payload: dict[str, Any], name: str | None = None) -> None:
    """Emit ``event`` for the current flow run with ``payload`` (+ ``upstream`` = this run)."""
    prefix, _ = LINKS[event]
    run_id = flow_run.get_id()
    resource = {"prefect.resource.id": f"{prefix}.{run_id}"}
    if name:
        resource["prefect.resource.name"] = name
    emit_event(
        event=event, resource=resource,
        related=[{"prefect.resource.id": f"prefect.flow-run.{run_id}", "prefect.resource.role": "flow-run"}],
        payload={**payload, "upstream": f"prefect.flow-run.{run_id}"},
    )


def payload_parameters(event: str) -> dict[str, str]:
    """The trigger parameters of the deployment that follows ``event``: its payload fields, templated."""
    return {field: f"{{{{ event.payload.{field} }}}}" for field in LINKS[event][1]}


def trigger_on(event: str, name: str, description: str, extra: dict[str, Any] | None = None) -> DeploymentEventTrigger:
    """A deployment trigger that runs its deployment on every ``event`` (any run of the emitting flow on the
    server), with the payload fields as parameters (plus ``extra``)."""
    prefix, _ = LINKS[event]
    return DeploymentEventTrigger(
        name=name, description=description, expect={event}, match={"prefect.resource.id": f"{prefix}.*"},
        parameters={**payload_parameters(event), **(extra or {})},
    )


# --------------------------------------------------------------------------------- what each chained flow loads
def _check_build(params: dict[str, Any]) -> None:
    from data_schemas import load_config

    load_config(params.get("config", "configs/smoke.yaml"), params.get("overrides"))


def _check_train(params: dict[str, Any]) -> None:
    from data_schemas import TrainConfig, load_config

    load_config(params.get("config", "configs/smoke.yaml"), params.get("overrides"), model=TrainConfig,
                section="train")


def _check_adapt(params: dict[str, Any]) -> None:
    from data_schemas import load_config
    from data_schemas.adapt_config import GlobalAdaptConfig, SegAdaptConfig

    model, section = {"global": (GlobalAdaptConfig, "adapt_global"), "seg": (SegAdaptConfig, "adapt_seg")}[
        params["task"]]
    load_config(params.get("config", "configs/adapt_smoke.yaml"), params.get("overrides"), model=model,
                section=section)


def _check_evaluate(params: dict[str, Any]) -> None:
    import inspect

    from model.eval.tasks import get_task

    accepted = inspect.signature(get_task(params["task"])).parameters
    options = set(params.get("options") or {})
    required = {name for name, p in list(accepted.items())[1:]  # the first one is the checkpoint
                if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if required - options:
        raise ValueError(f"evaluate task {params['task']!r} needs options {sorted(required - options)}")
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()) and options - set(accepted):
        raise ValueError(f"evaluate task {params['task']!r} takes no options {sorted(options - set(accepted))}")


#: flow name -> how its parameters are checked before a run (the loaders the flow itself calls)
PARAMETER_CHECKS = {"build-umg41m": _check_build, "train": _check_train, "adapt": _check_adapt,
                    "evaluate": _check_evaluate}


def check_parameters(flow_name: str, params: dict[str, Any]) -> None:
    """Load what flow ``flow_name`` would load from ``params`` (its config section, its evaluation task), so a
    deployment's parameters fail here, not when its first triggered run starts.

    Raises:
        data_schemas.ConfigError / ValueError / KeyError: what the flow would raise.
    """
    PARAMETER_CHECKS[flow_name](params)
