"""Serve the deployments ``build-umg41m/local``, ``train/local``, ``adapt/local`` and ``evaluate/local`` from one
process.

Build -> train chaining (one mechanism only): the build flow emits ``umg.build.completed`` as its last step,
and only when every shard is finished and the build validates; its payload carries the shard directory
and the config file. ``train/local`` has a ``DeploymentEventTrigger`` on that event that passes
``shards=<payload.shards>``, ``config=<payload.config>``, ``upstream=prefect.flow-run.<build run id>`` and
``out=<--train-out>``. A failed or partial build emits nothing, so training never starts from it.

Run from the project root with ``PREFECT_API_URL`` set::

    python -m flows.serve [--train-out out/train] [--limit 1] [--no-train]

The trigger is an automation stored on the server; it outlives this process (``prefect automation ls``).
Serving again replaces it; ``flows.services.delete_automations`` removes it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from prefect import serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.events import DeploymentEventTrigger

from flows.build import COMPLETED_EVENT, build_umg41m

BUILD_DEPLOYMENT = "build-umg41m/local"
TRAIN_DEPLOYMENT = "train/local"
EVALUATE_DEPLOYMENT = "evaluate/local"


def train_trigger(train_out: str) -> DeploymentEventTrigger:
    """Run ``train/local`` on every ``umg.build.completed`` event, on the build's shards."""
    return DeploymentEventTrigger(
        name="train-after-build",
        description="train on the shards of every completed build-umg41m run",
        expect={COMPLETED_EVENT},
        match={"prefect.resource.id": "umg.build.*"},
        parameters={
            "shards": "{{ event.payload.shards }}",
            "config": "{{ event.payload.config }}",
            "upstream": "{{ event.payload.upstream }}",
            "out": str(Path(train_out).resolve()),
        },
    )


def deployments(train_out: str = "out/train", with_train: bool = True) -> list[RunnerDeployment]:
    """The local deployments; entrypoints are module paths, so the serve process may run from anywhere."""
    served = [build_umg41m.to_deployment(
        name="local", description="annotate a source into UMG-41M-style shards (Ray actor pools)",
        entrypoint_type=EntrypointType.MODULE_PATH)]
    if with_train:
        from flows.adapt import adapt
        from flows.evaluate import evaluate
        from flows.train import train

        served.append(train.to_deployment(
            name="local", description="train UMG-CLIP on the shards of a completed build",
            triggers=[train_trigger(train_out)], entrypoint_type=EntrypointType.MODULE_PATH))
        served.append(adapt.to_deployment(
            name="local", description="Convpass PET of a trained checkpoint (task global | seg)",
            entrypoint_type=EntrypointType.MODULE_PATH))
        served.append(evaluate.to_deployment(
            name="local", description="evaluate a checkpoint: task=zeroshot|retrieval|…, options={...}",
            entrypoint_type=EntrypointType.MODULE_PATH))
    return served


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve",
                                     description="serve build-umg41m, train, adapt and evaluate")
    parser.add_argument("--train-out", default="out/train", help="checkpoint dir of triggered train runs")
    parser.add_argument("--limit", type=int, default=1, help="flow runs at once (build then train with 1)")
    parser.add_argument("--no-train", action="store_true", help="serve build-umg41m/local only")
    args = parser.parse_args(argv)
    serve(*deployments(args.train_out, with_train=not args.no_train), limit=args.limit)


if __name__ == "__main__":
    main()
