"""Which shard holds which sample key, so a key is written once per build even when shards run concurrently.

Keys come from source ids (sanitised); two inputs can map to one key. ``ShardWriter`` turns a key it is told is
taken into a ``duplicate_key`` error row. Shards running one after another could share a plain set; shards
running at once (threads, Ray tasks) ``claim`` their keys here just before writing: a key already held by
another shard comes back as taken. A shard that fails and is retried claims the same keys again and gets them
(claims are per shard name). ``RemoteKeyLedger`` is the same ledger as a Ray actor, for shard tasks.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

FINISHED = ""  # owner of keys already written by finished shards of an earlier run


class KeyLedger:
    """Key -> owning shard name; thread-safe."""

    def __init__(self, taken: Iterable[str] = ()) -> None:
        self._owner: dict[str, str] = dict.fromkeys(taken, FINISHED)
        self._lock = threading.Lock()

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


class RemoteKeyLedger:
    """A ``KeyLedger`` in a Ray actor; picklable, so shard tasks on any node can claim through it."""

    def __init__(self, taken: Iterable[str] = (), handle: Any = None) -> None:
        import ray

        self.handle = handle or ray.remote(num_cpus=0)(KeyLedger).remote(list(taken))

    def claim(self, shard: str, keys: Iterable[str]) -> set[str]:
        import ray

        return ray.get(self.handle.claim.remote(shard, list(keys)))

    def __reduce__(self):
        return (RemoteKeyLedger, ((), self.handle))
