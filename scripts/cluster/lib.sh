# shellcheck shell=bash
# Reusable start-up steps of the smoke cluster (scripts/cluster_smoke.sh; docs/orchestration.md "Scaling out").
# Source it, then set:
#   RUN   a run directory (logs, data, pid files under $RUN/pids; keep the path short: Ray's unix sockets live
#         below it and may not exceed 107 characters)
#   BIN   the venv's bin directory (prefect, ray, weed, python)
#   NS    a network namespace name (cluster_netns_create makes it) or empty: every service then runs in the
#         caller's own network namespace, still bound to 127.0.0.1
# Every service is started in its own session (setsid) with its pid in $RUN/pids/<name>.pid, and stopped by that
# pid (cluster_stop / cluster_stop_all): never by name.

cluster_log() { printf '[cluster %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# ---------------------------------------------------------------------------------------------- namespaces
# A network namespace of our own holds every service of the cluster. Its only interface is its loopback, so
# everything listens on 127.0.0.1 there and nothing can reach it from outside (not even this machine's other
# processes); several Ray nodes share that address (each its own raylet, object store and ports).
cluster_netns_create() {
  local name=$1
  ip netns add "$name"
  ip netns exec "$name" ip link set lo up
  cluster_log "network namespace $name (interfaces: lo 127.0.0.1 only)"
}

cluster_netns_delete() {
  local name=$1
  [[ -n $name ]] && ip netns list | grep -qw "$name" && ip netns delete "$name" || true
}

# Run a command in the cluster's namespace (or here when NS is empty).
in_ns() {
  if [[ -n ${NS:-} ]]; then ip netns exec "$NS" "$@"; else "$@"; fi
}

# ---------------------------------------------------------------------------------------------- processes
# cluster_start NAME CMD...: start CMD in the namespace, in its own session, output in $RUN/logs/NAME.log.
cluster_start() {
  local name=$1
  shift
  mkdir -p "$RUN/logs" "$RUN/pids"
  if [[ -n ${NS:-} ]]; then
    setsid ip netns exec "$NS" "$@" >>"$RUN/logs/$name.log" 2>&1 </dev/null &
  else
    setsid "$@" >>"$RUN/logs/$name.log" 2>&1 </dev/null &
  fi
  echo $! >"$RUN/pids/$name.pid"
  disown $!  # stopped by pid (cluster_stop), never waited for: no job messages from this shell
}

cluster_pid() { cat "$RUN/pids/$1.pid" 2>/dev/null; }

# cluster_stop NAME [TIMEOUT]: SIGTERM the service's pid, then SIGKILL its process group (its own session).
cluster_stop() {
  local name=$1 timeout=${2:-10} pid
  pid=$(cluster_pid "$name") || return 0
  [[ -n $pid ]] || return 0
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq $((timeout * 5))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  fi
  kill -KILL -- "-$pid" 2>/dev/null || true  # whatever of its session is left (children of a killed parent)
  rm -f "$RUN/pids/$name.pid"
}

# Stop every service with a pid file, newest first.
cluster_stop_all() {
  local f
  for f in $(ls -t "$RUN"/pids/*.pid 2>/dev/null); do
    cluster_log "stopping $(basename "$f" .pid) (pid $(cat "$f"))"
    cluster_stop "$(basename "$f" .pid)"
  done
}

# cluster_wait_port PORT NAME [TIMEOUT]: until something listens on 127.0.0.1:PORT in the namespace.
cluster_wait_port() {
  local port=$1 name=$2 timeout=${3:-60} pid
  pid=$(cluster_pid "$name")
  for _ in $(seq $((timeout * 2))); do
    if in_ns "$BIN/python" -c "import socket,sys; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null; then
      return 0
    fi
    if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
      cluster_log "$name exited before listening on $port; its log:"; tail -20 "$RUN/logs/$name.log" >&2; return 1
    fi
    sleep 0.5
  done
  cluster_log "$name not listening on 127.0.0.1:$port after ${timeout}s"; tail -20 "$RUN/logs/$name.log" >&2
  return 1
}

# ---------------------------------------------------------------------------------------------- PostgreSQL
# cluster_postgres PORT: a new database cluster in $RUN/pg (initdb as the unprivileged `postgres` user: the
# server refuses to run as root), listening on 127.0.0.1:PORT, password auth; database and role `prefect`.
# Sets PREFECT_DB_URL (postgresql+asyncpg://...).
cluster_postgres() {
  local port=$1 pgbin pass
  pgbin=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
  [[ -x $pgbin/initdb ]] || { cluster_log "PostgreSQL not found (apt-get install postgresql)"; return 1; }
  pass=$("$BIN/python" -c "import secrets; print(secrets.token_hex(16))")
  install -d -o postgres -m 700 "$RUN/pg" "$RUN/pg_sock"
  printf '%s\n' "$pass" >"$RUN/pg_pass" && chown postgres "$RUN/pg_pass" && chmod 600 "$RUN/pg_pass"
  runuser -u postgres -- "$pgbin/initdb" -D "$RUN/pg/data" -U postgres --pwfile="$RUN/pg_pass" \
    --auth-local=scram-sha-256 --auth-host=scram-sha-256 -E UTF8 >"$RUN/logs/initdb.log" 2>&1
  cluster_start postgres runuser -u postgres -- "$pgbin/postgres" -D "$RUN/pg/data" -p "$port" \
    -c listen_addresses=127.0.0.1 -c unix_socket_directories="$RUN/pg_sock" -c max_connections=200 \
    -c fsync=off -c synchronous_commit=off
  cluster_wait_port "$port" postgres 60
  PGPASSWORD=$pass in_ns "$pgbin/psql" -q -h 127.0.0.1 -p "$port" -U postgres -d postgres \
    -c "CREATE ROLE prefect LOGIN PASSWORD '$pass'" -c "CREATE DATABASE prefect OWNER prefect" >/dev/null
  PREFECT_DB_URL="postgresql+asyncpg://prefect:$pass@127.0.0.1:$port/prefect"
  cluster_log "PostgreSQL $("$pgbin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (data $RUN/pg/data)"
}

# ---------------------------------------------------------------------------------------------- Prefect
# cluster_prefect_server PORT: a Prefect server on 127.0.0.1:PORT with PREFECT_DB_URL as its database.
# Exports PREFECT_API_URL / PREFECT_HOME for every later command.
cluster_prefect_server() {
  local port=$1
  export PREFECT_HOME=$RUN/prefect PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_RUNNER_POLL_FREQUENCY=2 \
         PREFECT_API_URL=http://127.0.0.1:$port/api
  mkdir -p "$PREFECT_HOME"
  (  # the database URL (with its password) only in the server's environment, not on a command line
    export PREFECT_API_DATABASE_CONNECTION_URL=$PREFECT_DB_URL
    cluster_start prefect-server "$BIN/prefect" server start --host 127.0.0.1 --port "$port"
  )
  in_ns "$BIN/python" -m flows.services wait-healthy "$PREFECT_API_URL" --pid "$(cluster_pid prefect-server)" \
    --timeout 180
  cluster_log "Prefect server $PREFECT_API_URL (database: PostgreSQL)"
}

# cluster_prefect_worker POOL: a process work pool and one worker polling it (flow runs are its children).
cluster_prefect_worker() {
  local pool=$1
  in_ns "$BIN/prefect" --no-prompt work-pool create "$pool" --type process --overwrite >/dev/null
  cluster_start prefect-worker "$BIN/prefect" worker start --pool "$pool" --type process --name "$pool-worker-1"
  cluster_log "Prefect process worker on pool $pool (pid $(cluster_pid prefect-worker))"
}

# ---------------------------------------------------------------------------------------------- SeaweedFS
# cluster_seaweedfs BUCKET: SeaweedFS (master, volume, filer, S3 gateway; `python -m flows.object_store`) on free
# 127.0.0.1 ports, data in $RUN/s3, one identity with a random key; creates BUCKET. Exports the client
# variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL) from $RUN/s3/s3.env, and S3_ENDPOINT.
cluster_seaweedfs() {
  local bucket=$1 started
  mkdir -p "$RUN/s3"
  started=$(in_ns "$BIN/python" -m flows.object_store start "$RUN/s3" --bucket "$bucket")
  "$BIN/python" -c "import json, sys; print(json.loads(sys.argv[1])['pid'])" "$started" >"$RUN/pids/seaweedfs.pid"
  # shellcheck disable=SC1091
  source "$RUN/s3/s3.env"
  S3_ENDPOINT=$AWS_ENDPOINT_URL
  cluster_log "SeaweedFS S3 gateway $S3_ENDPOINT (pid $(cluster_pid seaweedfs), bucket s3://$bucket, data $RUN/s3)"
}

# ---------------------------------------------------------------------------------------------- Ray
# cluster_ray_env: token authentication with a token of this cluster only (not ~/.ray/auth_token).
cluster_ray_env() {
  if [[ ! -s $RUN/ray_token ]]; then
    "$BIN/python" -c "import secrets; print(secrets.token_hex(32))" >"$RUN/ray_token"
    chmod 600 "$RUN/ray_token"
  fi
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$RUN/ray_token RAY_USAGE_STATS_ENABLED=0
}

# cluster_ray_head GCS_PORT CPUS: the head node (GCS, its raylet) on 127.0.0.1; no dashboard. Sets RAY_ADDRESS_HEAD.
cluster_ray_head() {
  local port=$1 cpus=$2
  cluster_ray_env
  cluster_start ray-head "$BIN/ray" start --head --block --node-ip-address=127.0.0.1 --port="$port" \
    --num-cpus="$cpus" --num-gpus=0 --temp-dir="$RUN/ray" --include-dashboard=false --disable-usage-stats \
    --dashboard-agent-listen-port=$((port + 1)) --dashboard-agent-grpc-port=$((port + 2)) \
    --runtime-env-agent-port=$((port + 3)) --metrics-export-port=$((port + 4)) \
    --min-worker-port=$((port + 100)) --max-worker-port=$((port + 199))
  cluster_wait_port "$port" ray-head 90
  RAY_ADDRESS_HEAD=127.0.0.1:$port
  cluster_log "Ray head 127.0.0.1:$port (GCS; $cpus CPUs: with 0, every actor and task runs on a worker node)"
}

# cluster_ray_worker INDEX CPUS [GPUS]: worker node INDEX joins the head; its own raylet, object store and ports
# (offset by 1000 x INDEX from the head's). GPUS are logical GPUs (Ray schedules by them; no device needed).
cluster_ray_worker() {
  local index=$1 cpus=$2 gpus=${3:-0} base
  base=$(( ${RAY_ADDRESS_HEAD##*:} + 1000 * index ))
  cluster_ray_env
  cluster_start "ray-worker-$index" "$BIN/ray" start --block --address="$RAY_ADDRESS_HEAD" \
    --node-ip-address=127.0.0.1 --num-cpus="$cpus" --num-gpus="$gpus" --temp-dir="$RUN/ray" \
    --disable-usage-stats --resources="{\"umg_worker_$index\": 1}" \
    --node-manager-port=$((base)) --object-manager-port=$((base + 5)) \
    --dashboard-agent-listen-port=$((base + 1)) --dashboard-agent-grpc-port=$((base + 2)) \
    --runtime-env-agent-port=$((base + 3)) --metrics-export-port=$((base + 4)) \
    --min-worker-port=$((base + 100)) --max-worker-port=$((base + 199))
  cluster_wait_port "$base" "ray-worker-$index" 90
  cluster_log "Ray worker node $index: raylet 127.0.0.1:$base, $cpus CPUs, $gpus logical GPUs (pid $(cluster_pid "ray-worker-$index"))"
}

# cluster_ray_nodes N: wait until the cluster has N alive nodes.
cluster_ray_nodes() {
  local want=$1
  in_ns "$BIN/python" - "$RAY_ADDRESS_HEAD" "$want" <<'EOF'
import sys, time
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + 90
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= int(sys.argv[2]) or time.monotonic() > deadline:
        break
    time.sleep(1)
print(f"{len(alive)} Ray nodes alive: CPUs {ray.cluster_resources().get('CPU', 0):g}, "
      f"GPUs {ray.cluster_resources().get('GPU', 0):g}", file=sys.stderr)
sys.exit(0 if len(alive) >= int(sys.argv[2]) else 1)
EOF
}
