"""Which shard holds which sample key, so a key is written once per build even when shards run concurrently.

Keys come from source ids (sanitised); two inputs can map to one key. ``ShardWriter`` turns a key it is told is
taken into a ``duplicate_key`` error row. Shards running one after another could share a plain set; shards
running at once (threads, Ray tasks) ``claim`` their keys here just before writing: a key already held by
another shard comes back as taken. A shard that fails and is retried claims the same keys again and gets them
(claims are per shard name).

No process holds every key of a large build: ``RemoteKeyLedger`` splits the keys over several Ray actors by a
stable hash (``partition_of``), one ``KeyLedger`` each, and a shard's claim asks the partitions its keys fall in,
in parallel. The keys of shards finished by an earlier run enter the ledger shard by shard
(``pipeline.shards.iter_finished_keys``), so the driver never gathers them either.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

FINISHED = ""  # owner of keys already written by finished shards of an earlier run
KEYS_PER_PARTITION = 1_000_000  # default partition size of RemoteKeyLedger (~100 MB of keys per actor)


def partition_of(key: str, partitions: int) -> int:
    """The partition (``0 <= p < partitions``) of ``key``: a stable hash, the same in every process."""
    digest = hashlib.blake2b(key.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % partitions


def split_keys(keys: Iterable[str], partitions: int) -> dict[int, list[str]]:
    """``keys`` grouped by ``partition_of`` (only partitions that get a key appear)."""
    groups: dict[int, list[str]] = defaultdict(list)
    for key in keys:
        groups[partition_of(key, partitions) if partitions > 1 else 0].append(key)
    return groups


def partitions_for(n_inputs: int, configured: int = 0) -> int:
    """``configured`` partitions, or (0) one per ``KEYS_PER_PARTITION`` planned inputs, at least two."""
    return configured if configured > 0 else max(2, math.ceil(n_inputs / KEYS_PER_PARTITION))


class KeyLedger:
    """Key -> owning shard name; thread-safe. ``taken``: keys of finished shards, or batches of them."""

    def __init__(self, taken: Iterable[str] | Iterable[list[str]] = ()) -> None:
        self._owner: dict[str, str] = {}
        self._lock = threading.Lock()
        for item in taken:
            self.add_finished([item] if isinstance(item, str) else item)

    def add_finished(self, keys: Iterable[str]) -> None:
        """Record keys written by finished shards (they belong to no running shard)."""
        with self._lock:
            self._owner.update(dict.fromkeys(keys, FINISHED))

    def claim(self, shard: str, keys: Iterable[str]) -> set[str]:
        """Reserve ``keys`` for ``shard``; return those another shard (or a finished one) holds."""
        taken: set[str] = set()
        with self._lock:
            for key in keys:
                owner = self._owner.setdefault(key, shard)
                if owner != shard:
                    taken.add(key)
        return taken

    def size(self) -> int:
        """How many keys are held."""
        return len(self._owner)


class PartitionedKeyLedger:
    """``KeyLedger`` partitions of one build, each holding the keys ``partition_of`` sends it; same interface.

    In-process the parts are ``KeyLedger`` objects; ``RemoteKeyLedger`` makes them Ray actors.
    """

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts

    def _ask(self, method: str, groups: dict[int, list[str]], *args: Any) -> list[Any]:
        return [getattr(self.parts[p], method)(*args, part) for p, part in groups.items()]

    def add_finished(self, keys: Iterable[str]) -> None:
        self._ask("add_finished", split_keys(keys, len(self.parts)))

    def load(self, taken: Iterable[str] | Iterable[list[str]], batch: int = 50_000) -> None:
        """``add_finished`` for keys given one by one or in lists (one per shard), sent in batches."""
        pending: list[str] = []
        for item in taken:
            pending.extend([item] if isinstance(item, str) else item)
            if len(pending) >= batch:
                self.add_finished(pending)
                pending = []
        if pending:
            self.add_finished(pending)

    def claim(self, shard: str, keys: Iterable[str]) -> set[str]:
        return set().union(*self._ask("claim", split_keys(keys, len(self.parts)), shard))

    def sizes(self) -> list[int]:
        """Keys held by each partition."""
        return [part.size() for part in self.parts]


class RemoteKeyLedger(PartitionedKeyLedger):
    """The ledger split over ``partitions`` Ray actors (see the module docstring); picklable, so shard tasks on
    any node claim through it. ``taken`` as for ``KeyLedger`` (streamed to the actors in batches)."""

    def __init__(self, taken: Iterable[str] | Iterable[list[str]] = (), partitions: int = 2,
                 handles: list[Any] | None = None) -> None:
        import ray

        super().__init__(handles or [ray.remote(num_cpus=0)(KeyLedger).remote() for _ in range(partitions)])
        self.load(taken)

    def _ask(self, method: str, groups: dict[int, list[str]], *args: Any) -> list[Any]:
        import ray

        return ray.get([getattr(self.parts[p], method).remote(*args, part) for p, part in groups.items()])

    def sizes(self) -> list[int]:
        import ray

        return ray.get([part.size.remote() for part in self.parts])

    def ready(self) -> list[Any]:
        """Object refs that resolve once every partition actor is up."""
        return [part.size.remote() for part in self.parts]

    def __reduce__(self):
        return (RemoteKeyLedger, ((), len(self.parts), self.parts))
