"""Which call a dead actor was running: a death is blamed on that call only, not on the calls queued behind it.

An actor runs its calls one at a time (Ray's default for synchronous actors); the others wait in its queue. When
the process dies, Ray fails *every* call sent to it, the running one and the queued ones alike. Taken at face
value, an input queued behind a poison input (``pipeline.worker_deaths``) "killed its worker" as well: with several
batches in flight on one pool, an innocent input could end as a ``worker_lost`` error row.

The ledger tells them apart. Each call carries a fresh id; the actor writes it under its own actor id in the
cluster's key-value store (Ray's GCS, the store Ray's own libraries keep such state in) before it runs the
backend. After a death the caller reads the entry back: the call was running if the entry holds its id; otherwise
it never started, and the caller sends it again to a live actor (``pipeline.ray_pool.PoolClient.call``). An actor
the pool kills on purpose (``retire``) blames none of its calls.

The store is read and written through ``ray.experimental.internal_kv`` (no public API offers a cluster-wide
key-value store to actors); should it be unavailable, every death counts as the running call's, as before.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

log = logging.getLogger(__name__)

NAMESPACE = "umg-call-ledger"
RETIRED = "retired"  # the entry of an actor the pool kills on purpose: none of its calls is to blame


def new_call_id() -> str:
    return uuid.uuid4().hex


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


def mark_started(call_id: str) -> None:
    """In the actor, before the backend runs: this actor is now running ``call_id``."""
    import ray

    try:
        actor_id = ray.get_runtime_context().get_actor_id()
        _kv()._internal_kv_put(actor_id, call_id, overwrite=True, namespace=NAMESPACE)
    except Exception as exc:  # noqa: BLE001 - the ledger only sharpens blame; the call itself must run
        log.warning("call ledger unavailable (%s): a death will count against the running call", exc)


def was_running(actor: Any, call_id: str) -> bool:
    """In the caller, after ``actor`` died: whether it had started ``call_id`` (True when the ledger cannot say:
    the conservative answer, the death counts against this call)."""
    try:
        entry = _kv()._internal_kv_get(actor._actor_id.hex(), namespace=NAMESPACE)
    except Exception:  # noqa: BLE001
        return True
    return entry is not None and entry.decode() == call_id


def retire(actor: Any) -> None:
    """Before the pool kills ``actor`` on purpose (a breaker trip, a sticky error): the calls it fails that way,
    running or queued, are no input's fault and are sent again."""
    try:
        _kv()._internal_kv_put(actor._actor_id.hex(), RETIRED, overwrite=True, namespace=NAMESPACE)
    except Exception as exc:  # noqa: BLE001
        log.warning("call ledger unavailable (%s): calls of a retired actor will count as its deaths", exc)


def forget(actor: Any) -> None:
    """Drop a dead or retired actor's entry (best effort)."""
    try:
        _kv()._internal_kv_del(actor._actor_id.hex(), namespace=NAMESPACE)
    except Exception:  # noqa: BLE001
        pass
