"""Serve the deployments ``build-umg41m/local``, ``train/local``, ``adapt/local`` and ``evaluate/local`` from one
process, chained by events (``flows/chain.py``): build -> train -> adapt -> evaluate.

- ``train/local`` runs on every ``umg.build.completed`` (emitted only when every shard is finished and the
  build validates) with ``shards=<payload.shards>``, ``config=<payload.config>`` (locally one config file holds
  the ``build:`` and ``train:`` sections, e.g. ``configs/smoke.yaml``), ``out=<--train-out>``.
- ``adapt/local`` runs on every ``umg.train.completed``: Convpass PET (``task=global``) of the trained checkpoint
  on the same shards, with ``--adapt-config`` into ``--adapt-out``.
- ``evaluate/local`` runs on every ``umg.adapt.completed``: ``--eval-task`` on the adapted checkpoint with data
  ``--eval-data``, result JSON ``--eval-out`` (without ``--eval-data`` it is served without a trigger).

A failed step emits nothing, so the chain stops there. Run from the project root with ``PREFECT_API_URL`` set::

    python -m flows.serve [--train-out out/train] [--adapt-out out/adapt] [--eval-data DIR] [--limit 1]

The triggers are automations stored on the server; they outlive this process (``prefect automation ls``).
Serving again replaces them; ``flows.services.delete_automations`` removes them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prefect import serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.events import DeploymentEventTrigger

from flows.build import build_umg41m
from flows.chain import ADAPT_COMPLETED, BUILD_COMPLETED, TRAIN_COMPLETED, trigger_on

BUILD_DEPLOYMENT = "build-umg41m/local"
TRAIN_DEPLOYMENT = "train/local"
ADAPT_DEPLOYMENT = "adapt/local"
EVALUATE_DEPLOYMENT = "evaluate/local"
CHAIN_DEPLOYMENTS = (BUILD_DEPLOYMENT, TRAIN_DEPLOYMENT, ADAPT_DEPLOYMENT, EVALUATE_DEPLOYMENT)


@dataclass(frozen=True)
class ChainSettings:
    """Where the triggered runs write and what they evaluate (the static parameters of the chained deployments)."""

    train_out: str = "out/train"
    adapt_out: str = "out/adapt"
    adapt_config: str = "configs/adapt_smoke.yaml"
    eval_data: str | None = None
    eval_task: str = "zeroshot"
    eval_out: str = "out/eval/result.json"


def train_trigger(train_out: str) -> DeploymentEventTrigger:
    """Run ``train/local`` on every ``umg.build.completed`` event, on the build's shards and config."""
    return trigger_on(BUILD_COMPLETED, "train-after-build", "train on the shards of every completed build-umg41m run",
                      {"config": "{{ event.payload.config }}", "out": str(Path(train_out).resolve())})


def deployments(chain: ChainSettings | None = None, with_train: bool = True) -> list[RunnerDeployment]:
    """The local deployments; entrypoints are module paths, so the serve process may run from anywhere."""
    chain = chain or ChainSettings()
    served = [build_umg41m.to_deployment(
        name="local", description="annotate a source into UMG-41M-style shards (Ray actor pools)",
        entrypoint_type=EntrypointType.MODULE_PATH)]
    if with_train:
        from flows.adapt import adapt
        from flows.evaluate import evaluate
        from flows.train import train

        served.append(train.to_deployment(
            name="local", description="train UMG-CLIP on the shards of a completed build",
            triggers=[train_trigger(chain.train_out)], entrypoint_type=EntrypointType.MODULE_PATH))
        served.append(adapt.to_deployment(
            name="local", description="Convpass PET of a trained checkpoint (task global | seg)",
            parameters={"task": "global", "config": str(Path(chain.adapt_config).resolve()),
                        "out": str(Path(chain.adapt_out).resolve())},
            triggers=[trigger_on(TRAIN_COMPLETED, "adapt-after-train",
                                 "Convpass PET (global) of every completed train run, on its shards")],
            entrypoint_type=EntrypointType.MODULE_PATH))
        evaluate_triggers, evaluate_parameters = [], {}
        if chain.eval_data:
            evaluate_parameters = {"task": chain.eval_task, "options": {"data": str(Path(chain.eval_data).resolve())},
                                   "out": str(Path(chain.eval_out).resolve())}
            evaluate_triggers = [trigger_on(ADAPT_COMPLETED, "evaluate-after-adapt",
                                            f"{chain.eval_task} evaluation of every completed adapt run")]
        served.append(evaluate.to_deployment(
            name="local", description="evaluate a checkpoint: task=zeroshot|retrieval|…, options={...}",
            parameters=evaluate_parameters, triggers=evaluate_triggers, entrypoint_type=EntrypointType.MODULE_PATH))
    return served


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve",
                                     description="serve build-umg41m, train, adapt and evaluate, chained by events")
    defaults = ChainSettings()
    parser.add_argument("--train-out", default=defaults.train_out, help="run dir of triggered train runs")
    parser.add_argument("--adapt-out", default=defaults.adapt_out, help="out dir of triggered adapt runs")
    parser.add_argument("--adapt-config", default=defaults.adapt_config, help="config of triggered adapt runs")
    parser.add_argument("--eval-data", default=None, help="data of triggered evaluate runs (zeroshot: an ImageFolder, "
                        "e.g. <umg sample --eval>/classification/test); without it evaluate is not triggered")
    parser.add_argument("--eval-task", default=defaults.eval_task, help="task of triggered evaluate runs")
    parser.add_argument("--eval-out", default=defaults.eval_out, help="result JSON of triggered evaluate runs")
    parser.add_argument("--limit", type=int, default=1, help="flow runs at once (one step after the other with 1)")
    parser.add_argument("--no-train", action="store_true", help="serve build-umg41m/local only")
    args = parser.parse_args(argv)
    chain = ChainSettings(args.train_out, args.adapt_out, args.adapt_config, args.eval_data, args.eval_task,
                          args.eval_out)
    serve(*deployments(chain, with_train=not args.no_train), limit=args.limit)


if __name__ == "__main__":
    main()
