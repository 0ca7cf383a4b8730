#!/usr/bin/env bash
# The CPU image on the smoke config: `umg sample`, `umg build`, `umg train`, `umg eval zeroshot`, each in a fresh
# container of umg-clip:cpu (non-root user), sharing a throwaway volume. Prints the user the containers ran as
# and each command's last JSON line; the last line of all is a JSON summary.
# Variables: IMAGE (umg-clip:cpu), N_IMAGES (64). Build the image first: scripts/docker_build.sh cpu
set -euo pipefail
IMAGE=${IMAGE:-umg-clip:cpu}
N_IMAGES=${N_IMAGES:-64}
VOLUME=umg-cpu-smoke-$$
docker volume create "$VOLUME" >/dev/null
trap 'docker volume rm -f "$VOLUME" >/dev/null' EXIT
umg() { docker run --rm --network host -v "$VOLUME:/data" "$IMAGE" "$@"; }
last_json() { grep '^{' | tail -1; }

user=$(docker run --rm --entrypoint id "$IMAGE" -un)
uid=$(docker run --rm --entrypoint id "$IMAGE" -u)
echo "user: $user (uid $uid)"
[[ $uid != 0 ]] || { echo "the image runs as root" >&2; exit 1; }
start=$(date +%s)
sample=$(umg sample --out /data/d --n "$N_IMAGES" --seed 0 --shards --eval | last_json); echo "sample: $sample"
build=$(umg build --config configs/smoke.yaml --input /data/d/raw/images/train --output /data/built | last_json)
echo "build: $build"
train=$(umg train --config configs/smoke.yaml --shards /data/built --out /data/run | last_json); echo "train: $train"
eval=$(umg eval zeroshot --checkpoint /data/run --data /data/d/raw/classification/test | last_json)
echo "eval: $eval"
python3 -c 'import json, sys; keys = ("sample", "build", "train", "eval")
print(json.dumps({"image": sys.argv[1], "uid": int(sys.argv[2]), "seconds": int(sys.argv[3]),
                  **{k: json.loads(v) for k, v in zip(keys, sys.argv[4:])}}))' \
  "$IMAGE" "$uid" "$(( $(date +%s) - start ))" "$sample" "$build" "$train" "$eval"
