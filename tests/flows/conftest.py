"""One local Prefect server (SQLite in a temp PREFECT_HOME, 127.0.0.1, free port) for the flow tests.

The server is started by pid and stopped by that pid at the end of the session. Flows called in-process
talk to it through ``temporary_settings``; subprocesses get ``prefect_env`` (PREFECT_API_URL set).
"""

from __future__ import annotations

from pathlib import Path

import helpers_backends
import pytest

from flows import services

helpers_backends.register_all()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    home = tmp_path_factory.mktemp("prefect-home")
    server = services.start_server(home, log=home / "server.log")
    try:
        services.wait_healthy(server.url, pid=server.pid)
        with temporary_settings(updates={PREFECT_API_URL: server.url, PREFECT_HOME: str(home)}):
            yield server
            _drain_prefect_workers()
    finally:
        services.stop(server.pid)


def _drain_prefect_workers() -> None:
    """Send buffered logs / events before the server goes away (avoids 'Error logging to API')."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=5)
    EventsWorker.drain_all(timeout=5)


@pytest.fixture(scope="session")
def sample_raw(tmp_path_factory) -> Path:
    """16 digit-scene images with COCO ground truth (train/val/test splits)."""
    from pipeline.sample_data import generate_sample

    root = tmp_path_factory.mktemp("raw")
    generate_sample(root, n=16, seed=0)
    return root


@pytest.fixture
def flow_env(prefect_server, monkeypatch):
    """PREFECT_API_URL for code that reads the environment (subprocesses inherit it)."""
    monkeypatch.setenv("PREFECT_API_URL", prefect_server.url)
    monkeypatch.setenv("PREFECT_HOME", str(prefect_server.home))
    return prefect_server
