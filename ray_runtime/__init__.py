"""Start or join a Ray runtime: the one place that knows how a local Ray is kept on the loopback interface.

Shared by the annotation build (``pipeline.ray_pool``) and the Ray Train launcher (``model.launch``), which
may not import each other (DESIGN.md: ``model`` imports only ``data_schemas`` and ``pipeline.shards`` of
ours). Like ``data_schemas`` this package imports nothing of ours, so every package may import it.

- :func:`cluster_address`: the address to join: explicit, else ``$UMG_RAY_ADDRESS``, else ``$RAY_ADDRESS``.
- :func:`loopback_only`: while a local Ray starts, every server it spawns (gcs, raylet, agents, workers)
  binds 127.0.0.1.
- :func:`start_ray`: join the cluster, or start a local Ray (loopback only by default).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

#: Ray reads this at import: "0" makes a local node use the loopback address for every server it starts.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
#: Where a cluster address comes from when none is configured (docker/compose.yaml sets the first).
ADDRESS_ENV = ("UMG_RAY_ADDRESS", "RAY_ADDRESS")


def cluster_address(explicit: str | None = None) -> str | None:
    """``explicit``, else the first non-empty of ``$UMG_RAY_ADDRESS`` / ``$RAY_ADDRESS``, else None (local Ray)."""
    return explicit or next((os.environ[k] for k in ADDRESS_ENV if os.environ.get(k)), None)


@contextmanager
def loopback_only() -> Iterator[None]:
    """While a local Ray starts: every server it spawns binds 127.0.0.1.

    Ray resolves a local node's IP through ``ENABLE_RAY_CLUSTER`` (False on macOS/Windows -> 127.0.0.1), read
    from :data:`LOOPBACK_ENV` at import, so the module attribute is set too (covers a ``ray`` imported before).
    The processes started inside keep the setting (raylet-spawned workers inherit it); this process gets its
    own values back.
    """
    from ray._private import ray_constants

    env, attr = os.environ.get(LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = attr
        if env is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = env


def start_ray(address: str | None = None, *, loopback: bool = True, include_dashboard: bool = False,
              **init_kwargs: Any) -> bool:
    """Join the cluster at :func:`cluster_address`, else start a local Ray.

    Args:
        address: cluster address (``auto``, ``ray://head:10001``); None: the environment, else local.
        loopback: a local Ray listens on 127.0.0.1 only (:func:`loopback_only`); its dashboard too.
        include_dashboard: start the dashboard with a local Ray (Ray Train's controller polls its State API).
        init_kwargs: passed to ``ray.init`` (``num_cpus``, ``runtime_env``, ``log_to_driver`` …); resource
            counts apply to a local Ray only.

    Returns:
        True when this call initialised Ray (the caller then owns ``ray.shutdown()``), False when this process
        was already connected.
    """
    import ray

    if ray.is_initialized():
        return False
    joined = cluster_address(address)
    if joined:
        local_only = ("num_cpus", "num_gpus", "resources")
        ray.init(address=joined, **{k: v for k, v in init_kwargs.items() if k not in local_only})
        return True
    if include_dashboard:
        init_kwargs["dashboard_host"] = "127.0.0.1" if loopback else "0.0.0.0"
    with loopback_only() if loopback else nullcontext():
        ray.init(include_dashboard=include_dashboard, **init_kwargs)
    return True
