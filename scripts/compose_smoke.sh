#!/usr/bin/env bash
# The smoke cluster of docker/compose.yaml, end to end: build the images (unless SKIP_BUILD=1), bring the cluster
# up (PostgreSQL, Prefect server, SeaweedFS, Ray head + worker, Prefect worker; each waits for the healthchecks of
# what it needs), register the deployments of prefect.yaml, make sample data, run build-umg41m/cluster with
# configs/smoke.yaml on the two Ray nodes, writing the shards to the object store (s3://$BUCKET/shards), validate
# them, then take everything down (KEEP=1 leaves it up).
# Prints one JSON line last: the flow run's state, the seconds it took and `umg validate`'s counts.
#
# Variables: N_IMAGES (16), SHARD_SIZE (8), BUCKET (umg-smoke), PROJECT (umgsmoke: the compose project name),
# SKIP_BUILD (0), KEEP (0),
# TIMEOUT (1800 s for the flow run). Needs docker and docker-compose (v1 or v2).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
N_IMAGES=${N_IMAGES:-16}
SHARD_SIZE=${SHARD_SIZE:-8}
BUCKET=${BUCKET:-umg-smoke}
TIMEOUT=${TIMEOUT:-1800}
export COMPOSE_PROJECT_NAME=${PROJECT:-umgsmoke}
COMPOSE=(docker-compose -f docker/compose.yaml)
command -v docker-compose >/dev/null || COMPOSE=(docker compose -f docker/compose.yaml)

# Secrets of this run only (compose refuses to start without them).
RAY_AUTH_TOKEN=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
POSTGRES_PASSWORD=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
S3_ACCESS_KEY=umg$(python3 -c 'import secrets; print(secrets.token_hex(8))')
S3_SECRET_KEY=$(python3 -c 'import secrets; print(secrets.token_hex(20))')
export RAY_AUTH_TOKEN POSTGRES_PASSWORD S3_ACCESS_KEY S3_SECRET_KEY

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  scripts/docker_build.sh cpu
  scripts/docker_build.sh services
fi

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [[ ${KEEP:-0} == 1 ]]; then
    echo "cluster left up: ${COMPOSE[*]} -p $COMPOSE_PROJECT_NAME down -v   (to stop it)" >&2
  else
    "${COMPOSE[@]}" logs --no-color > "/tmp/$COMPOSE_PROJECT_NAME-compose.log" 2>&1 || true
    "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
    echo "cluster stopped (logs: /tmp/$COMPOSE_PROJECT_NAME-compose.log)" >&2
  fi
  exit "$status"
}
trap cleanup EXIT INT TERM

echo "== compose up" >&2
# docker-compose v1 gives up as soon as a dependency reports unhealthy, which a Ray node does for a moment when it
# restarts (restart: on-failure, compose.yaml); `up` is idempotent, so ask again.
for attempt in 1 2 3 4 5; do
  "${COMPOSE[@]}" up -d --no-build >&2 && break
  [[ $attempt == 5 ]] && { echo "compose up failed 5 times" >&2; exit 1; }
  sleep 10
done
container=$("${COMPOSE[@]}" ps -q prefect-worker)
for _ in $(seq 180); do  # up -d returns before the last service is healthy
  health=$(docker inspect --format '{{.State.Health.Status}}' "$container")
  [[ $health == healthy ]] && break
  [[ $health == unhealthy ]] && { echo "prefect-worker is unhealthy" >&2; exit 1; }
  sleep 2
done
[[ $health == healthy ]] || { echo "prefect-worker not healthy after 360 s" >&2; exit 1; }
"${COMPOSE[@]}" ps >&2

run() { "${COMPOSE[@]}" exec -T prefect-worker bash -c "$1"; }
echo "== deployments, sample data" >&2
run "prefect --no-prompt deploy --all" >&2
run "umg sample --out /data/raw --n $N_IMAGES --seed 0" >/dev/null
run "python -c 'import s3fs; s3fs.S3FileSystem().mkdir(\"$BUCKET\")'" >&2

echo "== build-umg41m/cluster on the Ray cluster" >&2
start=$(date +%s)
set +e
run "prefect deployment run build-umg41m/cluster -p config=configs/smoke.yaml -p input=/data/raw \
  -p output=s3://$BUCKET/shards -p 'overrides=[\"shard_size=$SHARD_SIZE\", \"annotate.tiny_models_dir=/data/tiny-models\"]' \
  --watch --watch-interval 5 --watch-timeout $TIMEOUT" > "/tmp/$COMPOSE_PROJECT_NAME-run.log" 2>&1
watch_status=$?
set -e
seconds=$(( $(date +%s) - start ))
tail -n 5 "/tmp/$COMPOSE_PROJECT_NAME-run.log" >&2
state=$(grep -o "finished in state [A-Za-z]*" "/tmp/$COMPOSE_PROJECT_NAME-run.log" | tail -1 | awk '{print $4}')
flow_run=$(grep -o "Flow run '[^']*'" "/tmp/$COMPOSE_PROJECT_NAME-run.log" | head -1 | cut -d"'" -f2)
nodes=$("${COMPOSE[@]}" exec -T ray-head bash -c 'ray status --address=$(hostname -i):6379' | grep -c ' node_')
validate=$(run "umg validate s3://$BUCKET/shards" | tail -1) || validate='{}'
python3 -c 'import json, sys
state, run, seconds, nodes, status = sys.argv[1:6]
print(json.dumps({"compose": "docker/compose.yaml", "deployment": "build-umg41m/cluster", "flow_run": run,
                  "state": state or None, "seconds": int(seconds), "ray_nodes": int(nodes),
                  "validate": json.loads(sys.argv[6] or "{}")}))' \
  "$state" "$flow_run" "$seconds" "$nodes" "$watch_status" "$validate"
[[ $watch_status == 0 && $state == Completed ]]
