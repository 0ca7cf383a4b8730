"""docker/compose.yaml's structure (the cluster itself is brought up by scripts/compose_smoke.sh, not in CI)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker" / "compose.yaml"
SERVICES = {"postgres", "prefect-server", "object-store", "ray-head", "ray-worker", "prefect-worker"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_the_smoke_cluster_services_are_all_there(compose):
    assert SERVICES <= set(compose["services"])


def test_every_service_has_a_healthcheck(compose):
    missing = [name for name, svc in compose["services"].items() if not svc.get("healthcheck", {}).get("test")]
    assert not missing, f"services without a healthcheck: {missing}"


def test_dependencies_wait_for_healthy_services(compose):
    services = compose["services"]
    for name, svc in services.items():
        depends = svc.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on must name conditions, not just services"
        for dep, spec in depends.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert spec == {"condition": "service_healthy"}, f"{name} -> {dep}: {spec}"
    # The start-up order the cluster needs.
    assert "postgres" in services["prefect-server"]["depends_on"]
    assert "ray-head" in services["ray-worker"]["depends_on"]
    assert {"prefect-server", "ray-worker"} <= set(services["prefect-worker"]["depends_on"])


def test_prefect_runs_on_postgres_not_sqlite(compose):
    assert "sqlite" not in COMPOSE.read_text().lower()
    url = compose["services"]["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://") and "@postgres:" in url


def test_ray_nodes_join_the_head_with_a_token(compose):
    services = compose["services"]
    for name in ("ray-worker", "prefect-worker"):
        command = " ".join(services[name]["command"])
        assert re.search(r"ray start .*--address=ray-head:6379", command), name
    for name in ("ray-head", "ray-worker", "prefect-worker"):
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?")


def test_every_image_is_built_from_this_repository(compose):
    for name, svc in compose["services"].items():
        build = svc.get("build")
        assert build, f"{name}: image {svc.get('image')} is not built here"
        dockerfile = (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve()
        assert dockerfile.is_file() and dockerfile.parent == ROOT / "docker", f"{name}: {dockerfile}"
        # scripts/docker_build.sh FLAVOUR tags docker/Dockerfile.FLAVOUR as umg-clip:FLAVOUR.
        assert svc["image"] == "umg-clip:" + dockerfile.suffix.lstrip("."), f"{name}: {svc['image']}"


def test_nothing_is_published_and_the_network_is_internal(compose):
    assert all("ports" not in svc for svc in compose["services"].values())
    assert all(net.get("internal") for net in compose["networks"].values())
    assert all(svc.get("network_mode") is None for svc in compose["services"].values())
