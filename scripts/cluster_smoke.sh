#!/usr/bin/env bash
# The smoke cluster (`make cluster-smoke`; docs/orchestration.md "Scaling out"): the cluster path of the project
# on this machine, every service a real server, all of it inside a network namespace of its own (loopback only):
#
#   1. network namespace $NS (only `lo`, 127.0.0.1): nothing outside it can reach the services
#   2. PostgreSQL (Debian's postgresql, initdb/postgres as the unprivileged `postgres` user) as Prefect's database,
#      and a Prefect server on it
#   3. SeaweedFS with its S3 gateway: bucket s3://$BUCKET holds the input images and the output shards
#   4. a Ray cluster: a head and $RAY_WORKERS worker nodes, each its own `ray start` (raylet, object store, ports;
#      token authentication with this cluster's own token); the flow joins it through $UMG_RAY_ADDRESS
#   5. a Prefect process work pool `umg` and a worker; the four deployments of prefect.yaml registered with
#      configs/cluster_smoke.yaml (tiny CPU models) and s3:// locations (`prefect deploy -n ... --params`)
#   6. `prefect deployment run build-umg41m/cluster`; after its first shard is written, `kill -9` of a Ray worker node
#      that hosts a model actor; the build still completes; its event starts train/cluster (reading the shards
#      from the object store), whose event starts adapt/cluster, whose event starts evaluate/cluster
#   7. `umg validate` on the bucket (every input exactly once), a second run of the build deployment (must write
#      nothing new and start no training)
#   8. stop everything by pid (also on failure), delete the namespace; print a JSON line last
#
# Variables: CLUSTER_DIR (/tmp/umgc-<pid>; logs stay there), N_IMAGES (48), RAY_WORKERS (2), BUCKET (umg-smoke),
# KILL_NODE (1), BIN (.venv/bin). Needs root (ip netns, runuser) and PostgreSQL binaries.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
STARTED=$(date +%s)

BIN=${BIN:-$ROOT/.venv/bin}
[[ $BIN = /* ]] || BIN=$ROOT/$BIN
RUN=${CLUSTER_DIR:-/tmp/umgc-$$}
NS=umgc-$$
N_IMAGES=${N_IMAGES:-48}
RAY_WORKERS=${RAY_WORKERS:-2}
BUCKET=${BUCKET:-umg-smoke}
KILL_NODE=${KILL_NODE:-1}
CONFIG=configs/cluster_smoke.yaml
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PREFECT_LOGGING_EXTRA_LOGGERS=pipeline,annotators

# shellcheck source=scripts/cluster/lib.sh
source scripts/cluster/lib.sh
TOOLS=("$BIN/python" scripts/cluster/tools.py)

RESULT_ERROR=""
finish() {
  local status=$?
  trap - EXIT INT TERM
  cluster_stop_all
  cluster_netns_delete "$NS"
  [[ $status -ne 0 && -z $RESULT_ERROR ]] && RESULT_ERROR="failed (exit $status); logs in $RUN/logs"
  if [[ -n $RESULT_ERROR ]]; then
    echo "{\"ok\": false, \"error\": \"$RESULT_ERROR\", \"logs\": \"$RUN/logs\", \"wall_s\": $(( $(date +%s) - STARTED ))}"
  fi
  exit "$status"
}
trap finish EXIT INT TERM

[[ $(id -u) == 0 ]] || { RESULT_ERROR="needs root (ip netns, runuser)"; exit 2; }
rm -rf "$RUN"
mkdir -p "$RUN/logs" "$RUN/pids"
cluster_log "run dir $RUN"

# Inside our own namespace every port is ours: fixed numbers, no collision with other servers on this machine.
cluster_netns_create "$NS"
cluster_postgres 5432
cluster_prefect_server 4200
cluster_seaweedfs "$BUCKET"
cluster_ray_head 6379 0
for i in $(seq "$RAY_WORKERS"); do cluster_ray_worker "$i" 2; done
cluster_ray_nodes $((RAY_WORKERS + 1))
export UMG_RAY_ADDRESS=$RAY_ADDRESS_HEAD UMG_PROJECT_DIR=$ROOT

cluster_log "sample data: $N_IMAGES digit scenes -> s3://$BUCKET/raw; held-out evaluation digits (local)"
"$BIN/umg" sample --out "$RUN/raw" --n "$N_IMAGES" --seed 0 >"$RUN/logs/sample.json"
"$BIN/umg" sample --out "$RUN/eval" --n 20 --seed 1 --eval >"$RUN/logs/sample_eval.json"
UPLOADED=$(in_ns "${TOOLS[@]}" upload "$RUN/raw" "s3://$BUCKET/raw")
cluster_log "uploaded $UPLOADED files to s3://$BUCKET/raw"

cluster_prefect_worker umg
deploy() {  # deploy NAME PARAMS_JSON: one deployment of prefect.yaml with this cluster's parameters
  in_ns "$BIN/prefect" --no-prompt deploy -n "$1" --params "$2" >>"$RUN/logs/deploy.log" 2>&1 \
    || { tail -30 "$RUN/logs/deploy.log" >&2; return 1; }
}
deploy build-umg41m/cluster "{\"config\": \"$CONFIG\", \"input\": \"s3://$BUCKET/raw\", \"output\": \"s3://$BUCKET/shards\"}"
deploy train/cluster "{\"config\": \"$CONFIG\", \"out\": \"$RUN/train\"}"
deploy adapt/cluster "{\"task\": \"global\", \"config\": \"$CONFIG\", \"out\": \"$RUN/adapt\"}"
deploy evaluate/cluster "{\"task\": \"zeroshot\", \"options\": {\"data\": \"$RUN/eval/classification/test\"}, \"out\": \"$RUN/eval_result.json\"}"
cluster_log "deployments build-umg41m/cluster, train/cluster, adapt/cluster, evaluate/cluster on pool umg"

cat <<WHERE
== smoke cluster (network namespace $NS: \`ip netns exec $NS ...\` reaches it; logs $RUN/logs)
  PostgreSQL        127.0.0.1:5432   database prefect        pid $(cluster_pid postgres)
  Prefect server    $PREFECT_API_URL             pid $(cluster_pid prefect-server)
  Prefect worker    pool umg (process)                    pid $(cluster_pid prefect-worker)
  SeaweedFS S3      $S3_ENDPOINT   bucket s3://$BUCKET    pid $(cluster_pid seaweedfs)
  Ray head          $RAY_ADDRESS_HEAD (GCS)                pid $(cluster_pid ray-head)
$(for i in $(seq "$RAY_WORKERS"); do echo "  Ray worker $i      127.0.0.1:$(( 6379 + 1000 * i )) (raylet), 2 CPUs          pid $(cluster_pid "ray-worker-$i")"; done)
WHERE

SINCE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
cluster_log "prefect deployment run build-umg41m/cluster"
in_ns "$BIN/prefect" deployment run build-umg41m/cluster --watch --watch-interval 2 --watch-timeout 900 \
  >"$RUN/logs/build_run.log" 2>&1 &
BUILD_WATCH=$!

KILLED=null
if [[ $KILL_NODE == 1 ]]; then
  in_ns "${TOOLS[@]}" wait-objects "s3://$BUCKET/shards" .stats.json 1 --timeout 900 >/dev/null
  node=$("${TOOLS[@]}" actor-node "$RUN"/pids/ray-worker-*.pid) || { RESULT_ERROR="no model actor on a worker node"; exit 1; }
  name=$(basename "$node" .pid)
  sid=$(cat "$node")
  # kill -9 every process of that node (its session: ray start, raylet, object store, workers, actors)
  victims=$(ps -eo pid=,sid= | awk -v s="$sid" '$2 == s {print $1}')
  cluster_log "first shard written; kill -9 Ray node $name (session $sid: $(echo $victims | wc -w) processes)"
  # shellcheck disable=SC2086
  kill -9 $victims 2>/dev/null || true  # some may have exited on their own meanwhile
  rm -f "$node"
  KILLED=\"$name\"
fi

wait "$BUILD_WATCH" || { tail -40 "$RUN/logs/build_run.log" >&2; RESULT_ERROR="build-umg41m/cluster run failed"; exit 1; }
cluster_log "build-umg41m/cluster completed; waiting for the runs its events start"
for step in train/cluster adapt/cluster evaluate/cluster; do
  in_ns "$BIN/python" -m flows.services wait-run "$step" --since "$SINCE" --timeout 900 | tee -a "$RUN/logs/chain.log" >&2 \
    || { RESULT_ERROR="$step did not complete"; exit 1; }
done

cluster_log "umg validate s3://$BUCKET/shards"
in_ns "$BIN/umg" validate "s3://$BUCKET/shards" >"$RUN/logs/validate.json"
BEFORE=$(in_ns "${TOOLS[@]}" etags "s3://$BUCKET/shards")

cluster_log "second run of build-umg41m/cluster (must write nothing and start no training)"
SECOND_SINCE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
in_ns "$BIN/prefect" deployment run build-umg41m/cluster --watch --watch-interval 2 --watch-timeout 600 \
  >"$RUN/logs/build_rerun.log" 2>&1 || { RESULT_ERROR="second build run failed"; exit 1; }
AFTER=$(in_ns "${TOOLS[@]}" etags "s3://$BUCKET/shards")
sleep 10  # a trigger fires within ~5 s of an event
NEW_TRAIN=$(in_ns "$BIN/python" -m flows.services count-runs train/cluster --since "$SECOND_SINCE")
RETRIED=$(in_ns "${TOOLS[@]}" retried-shards build-umg41m/cluster --since "$SINCE")

"$BIN/python" - "$RUN" "$BEFORE" "$AFTER" "$NEW_TRAIN" "$KILLED" "$RETRIED" "$N_IMAGES" "$NS" \
  "$(( $(date +%s) - STARTED ))" <<'EOF'
import json, sys
run, before, after, new_train, killed, retried, n_images, netns, wall = sys.argv[1:]
before, after = json.loads(before), json.loads(after)
validate = json.loads(open(f"{run}/logs/validate.json").read().strip().splitlines()[-1])
result = json.load(open(f"{run}/eval_result.json"))
changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
passed = (validate["ok"] and validate["inputs"] == int(n_images) and not changed and int(new_train) == 0)
print(json.dumps({
    "inputs": validate["inputs"], "ok": validate["samples"], "errors": validate["errors"], "shards": validate["shards"],
    "valid": validate["ok"], "killed_node": json.loads(killed), "retried_shards": json.loads(retried),
    "rerun_changed_objects": len(changed),
    "rerun_train_runs": int(new_train), "eval": {"task": result["task"], "dataset": result["dataset"],
                                                 **{k: round(v, 4) for k, v in result["metrics"].items()}},
    "passed": passed, "netns": netns, "wall_s": int(wall)}))
sys.exit(0 if passed else 1)
EOF
