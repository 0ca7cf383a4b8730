#!/usr/bin/env bash
# Build an image of docker/ from the repository root:  scripts/docker_build.sh cpu|cuda [docker build args...]
#
# Wheels that lie on this machine's disk in pip's local indexes (`pip config`: extra-index-url file://DIR/simple,
# e.g. the torch 2.14.1 wheels of requirements/lock.txt) reach the build through a throwaway HTTP server on
# 127.0.0.1 (the build runs with --network host; pip treats loopback as a secure origin), passed as
# PIP_EXTRA_INDEX_URL. Nothing is copied into the build context. LOCAL_INDEXES="DIR ..." overrides the list
# (each DIR holds a PEP 503 `simple/`); LOCAL_INDEXES="" uses the package registries only. The servers listen on
# fixed ports (LOCAL_INDEX_PORTS, one per index): the URLs are a build arg, part of every later layer's cache key,
# so a port that changed between builds would reinstall torch.
# Variables: TAG (umg-clip:<flavour>), PYTHON (python3), LOCAL_INDEX_PORTS ("31410 31411 ...").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
FLAVOUR=${1:?usage: scripts/docker_build.sh cpu|cuda [docker build args...]}
shift
TAG=${TAG:-umg-clip:$FLAVOUR}
PYTHON=${PYTHON:-python3}

if [[ -z ${LOCAL_INDEXES+x} ]]; then
  LOCAL_INDEXES=""
  for url in $(pip config get global.extra-index-url 2>/dev/null || true); do
    if [[ $url == file://*/simple ]]; then dir=${url#file://}; LOCAL_INDEXES+=" ${dir%/simple}"; fi
  done
fi

PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM
URLS=""
read -r -a PORTS <<< "${LOCAL_INDEX_PORTS:-31410 31411 31412 31413}"
i=0
for dir in $LOCAL_INDEXES; do
  port=${PORTS[$i]:?"more local indexes than LOCAL_INDEX_PORTS"}
  i=$((i + 1))
  if ! "$PYTHON" -c 'import socket, sys; socket.socket().bind(("127.0.0.1", int(sys.argv[1])))' "$port" 2>/dev/null; then
    echo "port $port is taken: set LOCAL_INDEX_PORTS to free ones (a new port rebuilds the layers after torch)" >&2
    exit 1
  fi
  "$PYTHON" -m http.server --bind 127.0.0.1 --directory "$dir" "$port" >/dev/null 2>&1 &
  PIDS+=($!)
  URLS+=" http://127.0.0.1:$port/simple"
  echo "local index $dir on http://127.0.0.1:$port/simple (pid $!)"
done
for url in $URLS; do  # wait until each server answers
  for _ in $(seq 50); do curl -sf -o /dev/null "$url/" && break; sleep 0.2; done
done

docker build --network host -f "docker/Dockerfile.$FLAVOUR" -t "$TAG" \
  --build-arg PIP_EXTRA_INDEX_URL="${URLS# }" "$@" .
