"""Shard circuit breaker and error kinds: tell a systematic failure (the infrastructure) from bad inputs.

``run_stage`` turns every annotator exception into an error row for that image, so one bad image never stops a
shard. When a stage fails on most of a shard (a broken CUDA context, a wrong config, a lost file system) that
would commit a shard full of error rows, which resume then skips. ``check_breaker`` trips instead: the shard
raises ``ShardTripped`` before its commit, so it stays unfinished and is retried / rebuilt. Many inputs of a
small shard can also fail for reasons of their own (degenerate images); ``pipeline.canary`` tells the two apart
before a trip counts: the same chain runs on an ordinary control image, and only when that fails too is the
failure systematic. Error rows of an
infrastructure kind (``is_infrastructure_error``) that did get committed can be rebuilt later
(``pipeline.repair``, ``umg build --retry-errors``). Pure functions on error strings; no I/O.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from data_schemas.config import BreakerConfig
from pipeline.shards import ShardError

#: Reasons ``run_stage`` / ``process_shard`` give when a model or the machine failed, not the input itself.
INFRASTRUCTURE_PREFIXES = ("annotator_failed:", "annotator_output:", "internal:")
_STAGE_ERROR = re.compile(r"^annotator_(?:failed|output): (?P<stage>[^:\s]+): ")


class ShardTripped(ShardError):
    """A stage failed on more of the shard than ``breaker.max_stage_failure`` allows; nothing was committed."""

    def __init__(self, message: str, stage: str = "") -> None:
        super().__init__(message)
        self.stage = stage


def is_infrastructure_error(reason: str | None) -> bool:
    """True for error rows a rerun may fix (annotator / internal failures); False for bad inputs
    (undecodable, too large, bad box, duplicate key ...), which fail the same way every time."""
    return bool(reason) and reason.startswith(INFRASTRUCTURE_PREFIXES)


def stage_failures(errors: Iterable[str | None]) -> Counter[str]:
    """Stage name -> how many of ``errors`` (error reasons, None for ok) that stage caused."""
    found = (_STAGE_ERROR.match(reason) for reason in errors if reason)
    return Counter(match["stage"] for match in found if match)


def check_breaker(shard: str, errors: list[str | None], cfg: BreakerConfig) -> None:
    """Raise ``ShardTripped`` when one stage failed on more than ``cfg.max_stage_failure`` of ``errors``
    (one entry per input that reached the annotators) and there are at least ``cfg.min_inputs`` of them."""
    if len(errors) < cfg.min_inputs:
        return
    for stage, n_failed in stage_failures(errors).most_common(1):
        if n_failed / len(errors) > cfg.max_stage_failure:
            example = next(reason for reason in errors if reason and _STAGE_ERROR.match(reason)
                           and _STAGE_ERROR.match(reason)["stage"] == stage)
            raise ShardTripped(
                f"shard {shard}: stage {stage} failed on {n_failed} of {len(errors)} inputs (breaker at "
                f"{cfg.max_stage_failure:.0%}): a systematic failure, the shard stays unfinished. First: {example}",
                stage)
