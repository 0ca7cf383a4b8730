#!/usr/bin/env bash
# Start PostgreSQL in the foreground (the `postgres` service of docker/compose.yaml): on first start initialise
# $PGDATA with a password-protected superuser $POSTGRES_USER and the database $POSTGRES_DB; listen on the
# container's addresses (the compose network is internal: no published port).
set -euo pipefail
: "${PGDATA:=/data/postgres/db}" "${POSTGRES_USER:=prefect}" "${POSTGRES_DB:=prefect}"
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
if [[ ! -s $PGDATA/PG_VERSION ]]; then
  pwfile=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
  initdb --pgdata="$PGDATA" --username="$POSTGRES_USER" --pwfile="$pwfile" --auth=scram-sha-256 >/dev/null
  rm -f "$pwfile"
  echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
  pg_ctl --pgdata="$PGDATA" --options="-c listen_addresses='' -c unix_socket_directories=/tmp" --wait start >/dev/null
  PGPASSWORD=$POSTGRES_PASSWORD createdb --host=/tmp --username="$POSTGRES_USER" "$POSTGRES_DB"
  pg_ctl --pgdata="$PGDATA" --wait stop >/dev/null
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/tmp
