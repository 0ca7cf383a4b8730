"""Small steps of scripts/cluster_smoke.sh that need Python: object-store calls, finding a Ray node to kill.

Credentials and the endpoint come from the standard variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``), as for every client of the project.

    python scripts/cluster/tools.py upload DIR s3://bucket/prefix      # copy a local folder, prints the count
    python scripts/cluster/tools.py wait-objects URL SUFFIX N [--timeout S]   # until N objects end with SUFFIX
    python scripts/cluster/tools.py etags URL                          # JSON {key: etag} of every object below
    python scripts/cluster/tools.py actor-node PIDFILE...              # the node (pid file) hosting a model actor
    python scripts/cluster/tools.py retried-shards DEPLOYMENT --since ISO8601   # shard tasks run more than once
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ACTOR_TITLE = "ray::AnnotatorActor"  # Ray sets a worker's process title to ray::<actor class>


def _fs():
    import fsspec

    return fsspec.filesystem("s3", use_listings_cache=False)


def upload(folder: Path, url: str) -> int:
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    fs = _fs()
    for path in files:
        fs.put_file(str(path), f"{url.rstrip('/')}/{path.relative_to(folder).as_posix()}")
    return len(files)


def wait_objects(url: str, suffix: str, count: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        fs = _fs()
        found = [p for p in (fs.find(url) if fs.exists(url) else []) if p.endswith(suffix)]
        if len(found) >= count or time.monotonic() > deadline:
            return len(found)
        time.sleep(0.5)


def etags(url: str) -> dict[str, str]:
    fs = _fs()
    return {path: str(info.get("ETag", info.get("size"))) for path, info in fs.find(url, detail=True).items()}


def actor_node(pid_files: list[Path]) -> str | None:
    """The pid file (one per Ray node, its process = the session leader of that node's processes) whose node
    runs a model actor; None when no actor runs on these nodes."""
    ps = subprocess.run(["ps", "-eo", "sid=,args="], capture_output=True, text=True, check=True).stdout
    sessions_with_actor = {int(line.split(None, 1)[0]) for line in ps.splitlines()
                           if ACTOR_TITLE in line.split(None, 1)[-1]}
    for pid_file in pid_files:
        if int(pid_file.read_text().strip()) in sessions_with_actor:
            return str(pid_file)
    return None


def retried_shards(deployment: str, since: str) -> list[str]:
    """Names of the shard task runs of the first run of ``deployment`` after ``since`` that ran more than once."""
    import datetime as dt

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.services import api, runs_since

    first = runs_since(deployment, dt.datetime.fromisoformat(since.replace("Z", "+00:00")))[0]
    with api(None) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[first.id])))
    return sorted(t.name for t in tasks if t.run_count > 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/cluster/tools.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upload")
    up.add_argument("folder", type=Path)
    up.add_argument("url")
    wait = sub.add_parser("wait-objects")
    wait.add_argument("url")
    wait.add_argument("suffix")
    wait.add_argument("count", type=int)
    wait.add_argument("--timeout", type=float, default=600)
    tags = sub.add_parser("etags")
    tags.add_argument("url")
    node = sub.add_parser("actor-node")
    node.add_argument("pid_files", nargs="+", type=Path)
    retried = sub.add_parser("retried-shards")
    retried.add_argument("deployment")
    retried.add_argument("--since", required=True)
    args = parser.parse_args(argv)
    if args.command == "upload":
        print(upload(args.folder, args.url))
    elif args.command == "wait-objects":
        found = wait_objects(args.url, args.suffix, args.count, args.timeout)
        print(found)
        return 0 if found >= args.count else 1
    elif args.command == "etags":
        print(json.dumps(etags(args.url), sort_keys=True))
    elif args.command == "retried-shards":
        print(json.dumps(retried_shards(args.deployment, args.since)))
    else:
        found = actor_node(args.pid_files)
        if found is None:
            return 1
        print(found)
    return 0


if __name__ == "__main__":
    sys.exit(main())
