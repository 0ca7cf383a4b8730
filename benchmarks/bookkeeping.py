"""Per-shard bookkeeping of a build stays flat with its size: 40,000 simulated shards, no models, no images.

Each simulated shard does what the build does around its models, with the library's own code: claim its keys in
the build's key ledger (``pipeline.key_ledger``: partitions chosen by ``partitions_for``, in-process here, Ray
actors in a build), write its shard (``ShardWriter``: an empty tar, a parquet of ``--keys`` rows, the stats
file) into a local build folder (tmpfs by default), and add its row to the flow's per-shard table (``flows.build._table_row``) and
progress count. The build manifest is written once at the end (``write_build_manifest``), timed on its own.

For contrast, ``--before`` shards (default 2,000, in a second folder) run the way the build did before: the
manifest rewritten and the folder listed after every shard, which re-reads every finished shard's stats.

Usage: ``python benchmarks/bookkeeping.py [--shards 40000] [--keys 32] [--window 1000]``.
Times are CPU times of this process; after each shard a control (the same bookkeeping in a build that stays
empty) is timed too. Last line: the median per-shard time of the last ``--window`` shards over that of the first,
each divided by its window's control median (goal <= 1.2); the raw medians are printed above it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from flows.build import _table_row
from pipeline.key_ledger import KeyLedger, PartitionedKeyLedger, partitions_for
from pipeline.shards import ShardWriter, finished_shards, write_build_manifest


def shard_bookkeeping(build_dir: Path, name: str, keys: list[str], ledger, rows: dict) -> None:
    """One shard's bookkeeping: claim its keys, write its files (stats last), add its table row."""
    taken = ledger.claim(name, keys)
    with ShardWriter(build_dir, name, taken_keys=taken) as writer:
        for key in keys:
            writer.write_error(key, f"{key}.jpg", "simulated: no image")
        stats = writer.commit()
    rows[name] = _table_row(stats)


def simulate(build_dir: Path, n_shards: int, keys_per_shard: int, ledger, per_shard_extra=None,
             control_dir: Path | None = None) -> tuple[list[float], list[float]]:
    """CPU seconds of bookkeeping of each simulated shard, in order, and of a control right after it.

    The control is the same bookkeeping for one shard in a build that stays empty (its files are removed
    again, a new ledger each time): the work that does not depend on how far the build is. Times are
    ``time.process_time`` (this process's user + system time), and the figure divides each window's median by
    its control's, so a machine shared with other jobs that slows down during the run does not read as growth.
    """
    rows: dict[str, dict] = {}
    seconds, control = [], []
    for i in range(n_shards):
        name = f"{i:05d}"
        keys = [f"s{i:05d}_{j:03d}" for j in range(keys_per_shard)]
        started = time.process_time()
        shard_bookkeeping(build_dir, name, keys, ledger, rows)
        if per_shard_extra is not None:
            per_shard_extra(build_dir)
        seconds.append(time.process_time() - started)
        if control_dir is not None:
            started = time.process_time()
            shard_bookkeeping(control_dir, name, keys, KeyLedger(), {})
            control.append(time.process_time() - started)
            for path in control_dir.iterdir():
                path.unlink()
    return seconds, control


def _before(build_dir: Path) -> None:
    write_build_manifest(build_dir)
    len(finished_shards(build_dir))


def window_medians(seconds: list[float], window: int) -> tuple[float, float]:
    return statistics.median(seconds[:window]), statistics.median(seconds[-window:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=40_000)
    parser.add_argument("--keys", type=int, default=32, help="inputs (keys) per shard")
    parser.add_argument("--window", type=int, default=1_000)
    parser.add_argument("--before", type=int, default=2_000, help="shards of the old per-shard manifest (0: skip)")
    parser.add_argument("--dir", default="/dev/shm" if Path("/dev/shm").is_dir() else None,
                        help="where the build folders go (default: tmpfs, so disk flushes do not drown the "
                        "bookkeeping being measured)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="umg-bookkeeping-", dir=args.dir) as tmp:
        if args.before:
            before, _ = simulate(Path(tmp) / "before", args.before, args.keys, KeyLedger(), per_shard_extra=_before)
            window = min(args.window, args.before // 4)
            first, last = window_medians(before, window)
            print(f"before (manifest rewritten + folder listed per shard), {args.before} shards: median "
                  f"{1e3 * first:.2f} ms (first {window}) -> {1e3 * last:.2f} ms (last {window}): x{last / first:.2f}")
        n_partitions = partitions_for(args.shards * args.keys)
        ledger = PartitionedKeyLedger([KeyLedger() for _ in range(n_partitions)])
        started = time.perf_counter()
        seconds, control = simulate(Path(tmp) / "now", args.shards, args.keys, ledger,
                                    control_dir=Path(tmp) / "control")
        loop_s = time.perf_counter() - started
        started = time.perf_counter()
        write_build_manifest(Path(tmp) / "now")
        manifest_s = time.perf_counter() - started
    sizes = ledger.sizes()
    print(f"now: {args.shards} shards x {args.keys} keys in {loop_s:.1f} s (with controls); key ledger: "
          f"{n_partitions} partitions, the largest holds {max(sizes):,} of {sum(sizes):,} keys; manifest written "
          f"once at the end: {manifest_s:.1f} s")
    (first, last), (control_first, control_last) = window_medians(seconds, args.window), window_medians(
        control, args.window)
    print(f"now: median per-shard bookkeeping {1e3 * first:.3f} ms (first {args.window}) -> {1e3 * last:.3f} ms "
          f"(last {args.window}); control {1e3 * control_first:.3f} -> {1e3 * control_last:.3f} ms")
    ratio = (last / control_last) / (first / control_first)
    print(f"per-shard overhead (vs control), last {args.window} / first {args.window} shards: {ratio:.3f}")


if __name__ == "__main__":
    main()
