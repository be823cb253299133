#!/usr/bin/env bash
# Issue 16's figures: GET /agents and POST /sessions on one host with SQLite,
# one host with PostgreSQL and two hosts with PostgreSQL (the same machine,
# the same run), then 1,000 streams across two hosts.
#
#   cargo bench --no-run && bench/hosts.sh
#
# Starts a throwaway PostgreSQL 15 (the Debian one: /usr/lib/postgresql/15)
# on a free loopback port, with its default durability (fsync on), unless
# BENCH_DATABASE_SERVER names one (postgres://USER@HOST:PORT). Each figure
# gets an empty database of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
if [ -z "${BENCH_DATABASE_SERVER:-}" ]; then
  as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
  pg_dir=$(mktemp -d /tmp/hangar-bench-pg.XXXXXX)
  if [ "$(id -u)" -eq 0 ]; then chown postgres: "$pg_dir"; fi
  trap 'as_pg "$PG_BIN/pg_ctl" -D "$pg_dir/data" stop -m fast >/dev/null 2>&1 || true; rm -rf "$pg_dir"' EXIT
  pg_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  as_pg "$PG_BIN/initdb" -D "$pg_dir/data" -U postgres --auth=trust --encoding=UTF8 >/dev/null
  as_pg "$PG_BIN/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/server.log" -w start \
    -o "-c listen_addresses=127.0.0.1 -p $pg_port -k $pg_dir -c max_connections=200" >/dev/null
  BENCH_DATABASE_SERVER="postgres://postgres@127.0.0.1:$pg_port"
fi
# Called in $(…), a subshell: a counter would not survive it, so each name is random.
fresh_db() { local name="hangar_bench_$(date +%s)_$RANDOM$RANDOM"; psql -q "$BENCH_DATABASE_SERVER/postgres" -c "CREATE DATABASE $name" >/dev/null; echo "$BENCH_DATABASE_SERVER/$name"; }

echo "## 1 host, SQLite"; bench/http_load.sh
echo; echo "## 1 host, PostgreSQL"; DATABASE_URL=$(fresh_db) HOSTS=1 bench/http_load.sh
echo; echo "## 2 hosts, PostgreSQL"; DATABASE_URL=$(fresh_db) HOSTS=2 bench/http_load.sh
echo; echo "## 1,000 streams across 2 hosts, PostgreSQL"
BENCH_DATABASE_URL=$(fresh_db) BENCH_HOSTS=2 cargo bench --bench streams -- sessions
