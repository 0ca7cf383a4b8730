"""Local services: loopback-only sockets (Prefect server, Ray), stop by pid, early failure detection."""

from __future__ import annotations

import os
import socket
import sys

import pytest

from data_schemas.config import RayConfig
from flows import services
from pipeline.ray_pool import start_ray


def test_prefect_server_and_ray_listen_on_loopback_only(prefect_server):
    import ray

    server_sockets = services.listening_sockets([prefect_server.pid])
    assert server_sockets, "the server listens nowhere?"
    assert all(services.is_loopback(ip) for _, _, ip, _ in server_sockets), server_sockets

    assert not ray.is_initialized()
    assert start_ray(RayConfig(num_cpus=1))
    try:
        ray_sockets = services.listening_sockets([os.getpid()])  # gcs, raylet, agents, workers: our children
        names = {name for _, name, _, _ in ray_sockets}
        assert {"gcs_server", "raylet"} <= names, names
        exposed = [s for s in ray_sockets if not services.is_loopback(s[2])]
        assert not exposed, f"Ray listens beyond loopback: {exposed}"
    finally:
        ray.shutdown()


def test_stop_escalates_to_sigkill_for_a_process_ignoring_sigterm(tmp_path):
    stubborn = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); "
                "time.sleep(60)")
    log = tmp_path / "stubborn.log"
    service = services.spawn("stubborn", [sys.executable, "-c", stubborn], dict(os.environ), log, None)
    while "up" not in log.read_text():
        pass
    services.stop(service.pid, timeout=1.0)
    assert not services.pid_alive(service.pid)
    services.stop(service.pid)  # stopping a stopped pid is a no-op


def test_wait_healthy_fails_fast_when_the_server_process_died():
    dead = services.spawn("dead", [sys.executable, "-c", "raise SystemExit(1)"], dict(os.environ), None, None)
    with pytest.raises(RuntimeError, match="exited before"):
        services.wait_healthy(f"http://127.0.0.1:{services.free_port()}/api", timeout=30, pid=dead.pid)


def test_free_port_is_bindable_on_loopback():
    port = services.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
