"""Start and stop a local Prefect server and the ``serve`` process by pid (tests, ``make demo``, benchmarks).

Everything binds 127.0.0.1. Each start returns a ``Service`` with the pid; ``stop`` ends only that pid (SIGTERM,
then SIGKILL to its own process group — it was started in a new session — if it does not exit).
Command line (used by ``scripts/demo.sh``)::

    python -m flows.services free-port
    python -m flows.services wait-healthy URL [--timeout S] [--pid PID]
    python -m flows.services wait-deployments build-umg41m/local train/local [--timeout S]
    python -m flows.services wait-run train/local --since ISO8601 [--timeout S]   # exit 1 unless Completed
    python -m flows.services count-runs train/local --since ISO8601               # runs created since then
    python -m flows.services stop PID [PID ...]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass
class Service:
    name: str
    pid: int
    log: Path | None = None
    popen: subprocess.Popen | None = None
    url: str | None = None
    home: Path | None = None
    env: dict[str, str] | None = None


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def prefect_env(home: Path, api_url: str | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for server / serve / CLI: own ``PREFECT_HOME``, no analytics, fast runner polling."""
    env = dict(os.environ if base is None else base)
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": env.get("PREFECT_RUNNER_POLL_FREQUENCY", "2"),
        "PREFECT_LOGGING_EXTRA_LOGGERS": env.get("PREFECT_LOGGING_EXTRA_LOGGERS", "pipeline,annotators"),
    })
    if api_url:
        env["PREFECT_API_URL"] = api_url
    else:
        env.pop("PREFECT_API_URL", None)
    return env


def venv_bin(name: str) -> str:
    """``name`` next to this Python (the venv's ``prefect``), else from PATH."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else name


def spawn(name: str, cmd: Sequence[str], env: dict[str, str], log: Path | None, cwd: Path | None) -> Service:
    """Start ``cmd`` in its own session (so ``stop`` can take its children), output appended to ``log``."""
    sink = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    try:
        popen = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        if log is not None:
            sink.close()
    return Service(name, popen.pid, log, popen)


def start_server(home: Path, port: int | None = None, log: Path | None = None) -> Service:
    """``prefect server start`` on 127.0.0.1 with SQLite under ``home``; call ``wait_healthy`` next."""
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cmd = [venv_bin("prefect"), "server", "start", "--host", LOOPBACK, "--port", str(port)]
    service = spawn("prefect-server", cmd, prefect_env(home), log, None)
    service.url, service.home = f"http://{LOOPBACK}:{port}/api", home
    service.env = prefect_env(home, service.url)  # for clients / CLI calls against this server
    return service


def wait_healthy(api_url: str, timeout: float = 90.0, pid: int | None = None) -> None:
    """Poll ``/health`` until it answers; fail early when ``pid`` (the server) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            if response.status == 200:
                return
        if pid is not None and not pid_alive(pid):
            raise RuntimeError(f"server process {pid} exited before {api_url} became healthy")
        time.sleep(0.3)
    raise TimeoutError(f"{api_url} not healthy after {timeout:.0f} s")


def start_serve(api_url: str, home: Path, args: Sequence[str] = (), log: Path | None = None,
                cwd: Path = ROOT, extra_env: dict[str, str] | None = None) -> Service:
    """``python -m flows.serve ARGS`` (serves build-umg41m/local, train/local, evaluate/local) against ``api_url``."""
    env = prefect_env(home, api_url)
    env.update(extra_env or {})
    return spawn("prefect-serve", [sys.executable, "-m", "flows.serve", *args], env, log, cwd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)  # reap our own exited child (a zombie still answers kill 0)
        if done == pid:
            return False
    return True


def stop(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM ``pid``; if still alive after ``timeout``, SIGKILL its process group (its own session)."""
    if not pid_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:  # a session leader we started: take its children with it
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    while pid_alive(pid) and time.monotonic() < deadline + 5:
        time.sleep(0.1)


@contextlib.contextmanager
def api(api_url: str | None) -> Iterator:
    """A sync Prefect client for ``api_url`` (or the configured one)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    updates = {PREFECT_API_URL: api_url} if api_url else {}
    with temporary_settings(updates=updates), get_client(sync_client=True) as client:
        yield client


def wait_deployments(names: Sequence[str], api_url: str | None = None, timeout: float = 120.0,
                     pid: int | None = None) -> dict[str, object]:
    """Wait until every ``flow/deployment`` name exists; returns name -> deployment."""
    from prefect.exceptions import ObjectNotFound

    found: dict[str, object] = {}
    deadline = time.monotonic() + timeout
    with api(api_url) as client:
        while True:
            for name in names:
                if name not in found:
                    with contextlib.suppress(ObjectNotFound):
                        found[name] = client.read_deployment_by_name(name)
            if len(found) == len(names):
                return found
            if pid is not None and not pid_alive(pid):
                raise RuntimeError(f"serve process {pid} exited before deployments {sorted(set(names) - set(found))}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"deployments {sorted(set(names) - set(found))} not registered in {timeout:.0f} s")
            time.sleep(0.5)


def wait_run(deployment: str, since: dt.datetime, api_url: str | None = None, timeout: float = 600.0):
    """The first flow run of ``deployment`` created after ``since``, once it is in a terminal state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = runs_since(deployment, since, api_url)
        if runs and runs[0].state_type is not None and runs[0].state_type.value in TERMINAL:
            return runs[0]
        time.sleep(1.0)
    raise TimeoutError(f"no finished run of {deployment} created after {since.isoformat()} in {timeout:.0f} s")


def runs_since(deployment: str, since: dt.datetime, api_url: str | None = None) -> list:
    """The flow runs of ``deployment`` created after ``since``, oldest first."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    with api(api_url) as client:
        deployment_id = client.read_deployment_by_name(deployment).id
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id])))
    return sorted((r for r in runs if r.created and r.created >= since), key=lambda r: r.created)


def delete_automations(deployment_names: Sequence[str], api_url: str | None = None) -> int:
    """Delete the automations (deployment triggers) owned by these deployments; returns how many."""
    from prefect.exceptions import ObjectNotFound

    deleted = 0
    with api(api_url) as client:
        for name in deployment_names:
            try:
                deployment_id = client.read_deployment_by_name(name).id
            except ObjectNotFound:
                continue
            owned = client.read_resource_related_automations(f"prefect.deployment.{deployment_id}")
            for automation in owned:
                client.delete_automation(automation.id)
                deleted += 1
    return deleted


def listening_sockets(pids: Sequence[int]) -> list[tuple[int, str, str, int]]:
    """``(pid, process name, ip, port)`` of every LISTEN socket of ``pids`` and their descendants."""
    import psutil

    procs: dict[int, psutil.Process] = {}
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(pid)
            procs[pid] = proc
            procs.update({child.pid: child for child in proc.children(recursive=True)})
    found = []
    for pid, proc in procs.items():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((pid, proc.name(), conn.laddr.ip, conn.laddr.port))
    return found


def is_loopback(ip: str) -> bool:
    return ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") or ip.startswith("127.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.services", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("free-port")
    healthy = sub.add_parser("wait-healthy")
    healthy.add_argument("url")
    healthy.add_argument("--timeout", type=float, default=90.0)
    healthy.add_argument("--pid", type=int)
    deps = sub.add_parser("wait-deployments")
    deps.add_argument("names", nargs="+")
    deps.add_argument("--timeout", type=float, default=120.0)
    deps.add_argument("--pid", type=int)
    run = sub.add_parser("wait-run")
    run.add_argument("deployment")
    run.add_argument("--since", required=True, help="ISO 8601 time, e.g. from date -u +%%FT%%TZ")
    run.add_argument("--timeout", type=float, default=600.0)
    count = sub.add_parser("count-runs")
    count.add_argument("deployment")
    count.add_argument("--since", required=True, help="ISO 8601 time")
    stopper = sub.add_parser("stop")
    stopper.add_argument("pids", nargs="+", type=int)
    args = parser.parse_args(argv)
    if args.command == "free-port":
        print(free_port())
    elif args.command == "wait-healthy":
        wait_healthy(args.url, args.timeout, args.pid)
    elif args.command == "wait-deployments":
        wait_deployments(args.names, timeout=args.timeout, pid=args.pid)
    elif args.command == "wait-run":
        since = dt.datetime.fromisoformat(args.since.replace("Z", "+00:00"))
        flow_run = wait_run(args.deployment, since, timeout=args.timeout)
        print(f"{args.deployment}: run {flow_run.name} ({flow_run.id}) {flow_run.state_type.value}")
        return 0 if flow_run.state_type.value == "COMPLETED" else 1
    elif args.command == "count-runs":
        since = dt.datetime.fromisoformat(args.since.replace("Z", "+00:00"))
        print(len(runs_since(args.deployment, since)))
    elif args.command == "stop":
        for pid in args.pids:
            stop(pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
