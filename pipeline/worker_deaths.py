"""Find the input that kills its worker: bisect a batch across worker restarts instead of failing the shard.

A model call whose worker process dies (``annotators.WorkerLost``: a segfault in a decoder, the OOM killer, a
CUDA abort on one malformed input) used to fail the whole shard; the shard was retried, the same input killed
the replacement worker again, and the shard ended failed with every good input in it. ``call_bisecting`` runs
the call again on the two halves of the batch (the pool has replaced the dead worker meanwhile), down to single
inputs; a single input whose worker dies twice is *poison*: it becomes one error row (``on_poison``) and the
rest of the batch is annotated (when nothing of the batch went through, the deaths are no input's fault). A budget of deaths per call (``DeathBudget``: about two per halving level)
tells poison from a systematic loss (a node going away, every worker dying): past it ``WorkerLost`` propagates
as before, and the orchestrator retries the shard.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import annotators

T = TypeVar("T")


class DeathBudget:
    """Worker deaths one batched call may absorb while bisecting ``n`` inputs: ``2 * ceil(log2(n + 1)) + 2``
    (one poison input costs one death per halving level plus one to confirm it alone). Also records whether any
    part of the batch went through: without that, every input "killing" its worker is a systematic loss."""

    def __init__(self, n: int) -> None:
        self.left = 2 * math.ceil(math.log2(n + 1)) + 2
        self.succeeded = False
        self.suspects: list[tuple[Any, BaseException]] = []

    def spend(self) -> bool:
        """Count one death; False once the budget is exhausted."""
        self.left -= 1
        return self.left >= 0


def call_bisecting(items: Sequence[T], call: Callable[[Sequence[T]], list[Any]],
                   on_poison: Callable[[T, BaseException], None]) -> list[Any]:
    """``call(items)``, one output per item; when the worker dies, the halves are called again (see the module
    docstring). A poison item gets ``on_poison(item, error)`` and the output None — only when some other part of
    the batch went through (a worker that dies on everything is no poison input).

    Raises:
        annotators.WorkerLost: more deaths than the budget allows, or every call died (a systematic loss).
    """
    budget = DeathBudget(len(items))
    outputs = _bisect(items, call, budget, alone=False)
    if budget.suspects and not budget.succeeded:
        raise budget.suspects[0][1]
    for item, exc in budget.suspects:
        on_poison(item, exc)
    return outputs


def _bisect(items: Sequence[T], call: Callable[[Sequence[T]], list[Any]], budget: DeathBudget,
            alone: bool) -> list[Any]:
    try:
        outputs = call(items)
        budget.succeeded = True
        return outputs
    except annotators.WorkerLost as exc:
        if not budget.spend():
            raise
        if len(items) == 1 and alone:
            budget.suspects.append((items[0], exc))
            return [None]
        if len(items) == 1:
            return _bisect(items, call, budget, alone=True)
        half = len(items) // 2
        return _bisect(items[:half], call, budget, False) + _bisect(items[half:], call, budget, False)


def poison_reason(stage: str, exc: BaseException) -> str:
    """The error row of a poison input: ``worker_lost: <stage>: …`` (the input's own fault, not retried)."""
    detail = " ".join(str(exc).split())[:300]
    return f"worker_lost: {stage}: the worker died on this input alone, twice; the rest of its batch was annotated " \
           f"({detail})"
