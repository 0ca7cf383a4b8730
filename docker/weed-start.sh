#!/usr/bin/env bash
# Start SeaweedFS in the foreground (the `object-store` service of docker/compose.yaml): master, volume, filer and
# the S3 gateway on port 8333, data under $WEED_DIR, one S3 identity from $S3_ACCESS_KEY / $S3_SECRET_KEY (the
# clients' AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY). Binds the container's addresses only (internal network).
set -euo pipefail
: "${WEED_DIR:=/data/weed}" "${S3_ACCESS_KEY:?set S3_ACCESS_KEY}" "${S3_SECRET_KEY:?set S3_SECRET_KEY}"
mkdir -p "$WEED_DIR/data"
umask 077
printf '{"identities": [{"name": "umg", "credentials": [{"accessKey": "%s", "secretKey": "%s"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}\n' "$S3_ACCESS_KEY" "$S3_SECRET_KEY" \
  > "$WEED_DIR/s3.json"
exec weed server -dir="$WEED_DIR/data" -ip="$(hostname -i)" -ip.bind=0.0.0.0 -s3 -s3.port=8333 \
  -s3.config="$WEED_DIR/s3.json" -master.port=9333 -volume.port=8080 -filer.port=8888 \
  -master.telemetry=false -volume.max=0 -master.volumeSizeLimitMB=64
