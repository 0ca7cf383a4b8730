"""The command-line shell every experiment script shares: parse, run, print the report JSON last."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any


def run_cli(parse_args: Callable[[list[str] | None], Any], run: Callable[[Any], dict], argv: list[str] | None) -> int:
    """``run(parse_args(argv))``; prints its report as JSON (last line) and returns 0, or one ``error:`` line on
    stderr and 2 for a bad input (``ValueError`` / ``FileNotFoundError`` / ``RuntimeError``)."""
    args = parse_args(argv)
    try:
        report = run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(json.dumps(report, sort_keys=True))
    return 0


def parse_experiment_args(parser, argv: list[str] | None, quick: dict):
    """``parser.parse_args(argv)`` plus what the digit-scene experiments share: ``args.argv`` (for the report's
    command), ``--quick`` (``quick``'s ``n``, ``steps``, ``seeds`` where the parser has ``--seeds``, and its
    ``overrides`` before the user's ``--set``), and the ``--n`` / ``--steps`` bounds."""
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.n, args.steps = quick["n"], quick["steps"]
        if hasattr(args, "seeds"):
            args.seeds = quick["seeds"]
        args.extra_overrides = [*quick["overrides"], *args.extra_overrides]
    if args.n < 10 or args.steps < 1:
        parser.error("--n must be >= 10 (every split needs images) and --steps >= 1")
    return args
