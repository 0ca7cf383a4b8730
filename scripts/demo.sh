#!/usr/bin/env bash
# The main job (`make demo`): the orchestrated build on the bundled sample data, then training, adaptation and
# evaluation, each step started by the previous one's event (flows/chain.py).
#
#   1. start a local Prefect server (SQLite in .prefect/, 127.0.0.1, a free port, analytics off)
#   2. generate 64 digit-scene images (exact ground truth) in $DEMO_DIR/raw, and held-out evaluation data
#      (another seed, `umg sample --eval`) in $DEMO_DIR/eval
#   3. serve build-umg41m/local, train/local, adapt/local and evaluate/local (flows/serve.py)
#   4. run build-umg41m/local on them with $CONFIG (Ray actor pools, one per annotator) and watch it
#   5. wait for the runs the events trigger: train/local (umg.build.completed), adapt/local (umg.train.completed:
#      Convpass PET with $ADAPT_CONFIG), evaluate/local (umg.adapt.completed: zero-shot classification of the
#      adapted model on the held-out digits)
#   6. validate the shards, export COCO JSON, print where everything is and the evaluation's figures
#   7. stop what this script started, by pid: the serve process and the server
#      (KEEP_SERVER=1 leaves the server running for the UI and prints its pid)
#
# Variables: DEMO_DIR (out/demo), CONFIG (configs/smoke.yaml), ADAPT_CONFIG (configs/adapt_smoke.yaml),
# N_IMAGES (64), SHARD_SIZE (16), PREFECT_PORT (free), KEEP_SERVER (0), BIN (.venv/bin).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BIN=${BIN:-.venv/bin}
PY=$BIN/python
DEMO_DIR=${DEMO_DIR:-out/demo}
CONFIG=${CONFIG:-configs/smoke.yaml}
ADAPT_CONFIG=${ADAPT_CONFIG:-configs/adapt_smoke.yaml}
N_IMAGES=${N_IMAGES:-64}
SHARD_SIZE=${SHARD_SIZE:-16}
KEEP_SERVER=${KEEP_SERVER:-0}
LOGS=$DEMO_DIR/logs

export PREFECT_HOME=$PWD/.prefect PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_RUNNER_POLL_FREQUENCY=2 \
       PREFECT_LOGGING_EXTRA_LOGGERS=pipeline,annotators
PORT=${PREFECT_PORT:-$($PY -m flows.services free-port)}
export PREFECT_API_URL=http://127.0.0.1:$PORT/api
UI=http://127.0.0.1:$PORT

SERVER_PID=""
SERVE_PID=""
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [[ -n $SERVE_PID ]]; then
    echo "stopping serve (pid $SERVE_PID)"
    "$PY" -m flows.services stop "$SERVE_PID" || true
  fi
  if [[ -n $SERVER_PID ]]; then
    if [[ $KEEP_SERVER == 1 ]]; then
      echo "Prefect server left running: pid $SERVER_PID, UI $UI (stop it with: kill $SERVER_PID)"
    else
      echo "stopping Prefect server (pid $SERVER_PID)"
      "$PY" -m flows.services stop "$SERVER_PID" || true
    fi
  fi
  exit "$status"
}
trap cleanup EXIT INT TERM

rm -rf "$DEMO_DIR"
mkdir -p "$LOGS" "$PREFECT_HOME"

echo "== Prefect server on $UI (logs: $LOGS/server.log)"
nohup "$BIN/prefect" server start --host 127.0.0.1 --port "$PORT" >"$LOGS/server.log" 2>&1 &
SERVER_PID=$!
"$PY" -m flows.services wait-healthy "$PREFECT_API_URL" --pid "$SERVER_PID" --timeout 120

echo "== sample data: $N_IMAGES digit scenes; held-out evaluation digits"
"$BIN/umg" sample --out "$DEMO_DIR/raw" --n "$N_IMAGES" --seed 0 >"$LOGS/sample.json"
"$BIN/umg" sample --out "$DEMO_DIR/eval" --n 40 --seed 1 --eval >"$LOGS/sample_eval.json"
EVAL_DATA=$DEMO_DIR/eval/classification/test

echo "== serving build-umg41m/local, train/local, adapt/local, evaluate/local (logs: $LOGS/serve.log)"
nohup "$PY" -m flows.serve --train-out "$DEMO_DIR/train" --adapt-out "$DEMO_DIR/adapt" --adapt-config "$ADAPT_CONFIG" \
  --eval-data "$EVAL_DATA" --eval-out "$DEMO_DIR/eval_result.json" >"$LOGS/serve.log" 2>&1 &
SERVE_PID=$!
"$PY" -m flows.services wait-deployments build-umg41m/local train/local adapt/local evaluate/local \
  --pid "$SERVE_PID" --timeout 300

echo "== build-umg41m/local with $CONFIG"
SINCE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
"$BIN/prefect" deployment run build-umg41m/local \
  -p "config=$CONFIG" -p "input=$DEMO_DIR/raw" -p "output=$DEMO_DIR/shards" \
  -p "overrides=[\"shard_size=$SHARD_SIZE\"]" \
  --watch --watch-interval 2 --watch-timeout 1800

echo "== waiting for the runs the events trigger: train/local -> adapt/local -> evaluate/local"
for step in train/local adapt/local evaluate/local; do
  "$PY" -m flows.services wait-run "$step" --since "$SINCE" --timeout 1800
done

echo "== validate + COCO export"
"$BIN/umg" validate "$DEMO_DIR/shards" | tee "$LOGS/validate.json"
"$BIN/umg" export-coco "$DEMO_DIR/shards" --out "$DEMO_DIR/coco.json" | tee "$LOGS/export.json"

LATEST=$DEMO_DIR/train/checkpoints/$(cat "$DEMO_DIR/train/checkpoints/latest" 2>/dev/null || echo "?")
cat <<SUMMARY

demo done
  Prefect UI      $UI   (runs, task runs per shard, artifacts: progress, shard table, QA report)
  shards          $DEMO_DIR/shards   (WebDataset tars + parquet manifests; _manifest.parquet)
  QA overlays     $DEMO_DIR/shards/_qa/
  COCO export     $DEMO_DIR/coco.json
  checkpoint      $LATEST
  training run    $DEMO_DIR/train   (metrics.csv)
  adapted model   $DEMO_DIR/adapt   (Convpass PET, triggered by the training run's event)
  evaluation      $DEMO_DIR/eval_result.json   (+ .md; artifact umg-eval-zeroshot-metrics)
  logs            $LOGS/
SUMMARY
if [[ $KEEP_SERVER != 1 ]]; then
  echo "  (the server is stopped now; KEEP_SERVER=1 make demo keeps the UI up)"
fi
echo
echo "evaluate/local (triggered by adapt/local's event) on $EVAL_DATA:"
cat "$DEMO_DIR/eval_result.md"
"$PY" -c 'import json, sys; r = json.load(open(sys.argv[1])); print(json.dumps({"task": r["task"], **r["metrics"]}))' \
  "$DEMO_DIR/eval_result.json"
