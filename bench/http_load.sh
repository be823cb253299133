#!/usr/bin/env bash
# Figure 3: GET /health, GET /agents and POST /sessions at 64 connections, with wrk.
#
#   bench/http_load.sh            # DURATION=10s CONNECTIONS=64 THREADS=2 by default
#   DATABASE_URL=postgres://… HOSTS=2 bench/http_load.sh
#                                 # HOSTS hosts on one PostgreSQL database (an empty
#                                 # one); the connections are split between them, one
#                                 # wrk per host at once, as a load balancer would
#
# Uses the release binary built by `cargo bench --no-run` (target/release/hangar).
# Loopback only. The server and wrk share the machine: note its load.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
bench_tmp hangar-http-load
HOSTS=${HOSTS:-1}
DB=${DATABASE_URL:-$TMP/hangar.db}
mkdir -p "$TMP/work"
BASES=()
for h in $(seq 1 "$HOSTS"); do
  start_server "host$h" "$DB"
  BASES+=("$STARTED")
done
BASE=${BASES[0]}
for base in "${BASES[@]}"; do wait_ready "$base"; done
make_agents "$BASE"
machine_line
echo "GET /agents returns $(curl -fs "$BASE/agents" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))') agents"

run() { # name, path, wrk args...: one wrk per host at once; req/s summed, the worst p50/p99
  local name=$1 path=$2; shift 2
  local conns=$(( CONNECTIONS / HOSTS )) h=0 wrks=()
  for base in "${BASES[@]}"; do
    h=$((h + 1))
    wrk -t"$THREADS" -c"$conns" -d"$DURATION" --latency "$@" "$base$path" >"$TMP/${name//[^a-zA-Z]/_}.$h.txt" &
    wrks+=($!)
  done
  wait "${wrks[@]}"
  local rps=0 p50="" p99="" errs="" out
  for out in "$TMP/${name//[^a-zA-Z]/_}".*.txt; do
    rps=$(awk -v a="$rps" '/^Requests\/sec/ {printf "%.0f", a + $2}' "$out")
    p50="$p50 $(awk '$1=="50%" {print $2}' "$out")"
    p99="$p99 $(awk '$1=="99%" {print $2}' "$out")"
    errs="$errs$(grep -E 'Non-2xx|Socket errors' "$out" | tr '\n' ' ' || true)"
  done
  printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$name" "$HOSTS" "$CONNECTIONS" "$rps" "${p50# }" "${p99# }" "${errs:-none}"
}
echo
echo "database: $([ -n "${DATABASE_URL:-}" ] && echo PostgreSQL || echo SQLite), $HOSTS host(s)"
echo "| request | hosts | connections | req/s | p50 (per host) | p99 (per host) | errors |"
echo "|---|---|---|---|---|---|---|"
# The HTTP stack alone, for the ratio GET /agents is held to (issue 21, item 5a).
run "GET /health" /health
run "GET /agents" /agents
WORK_DIR=$TMP/work run "POST /sessions" /sessions -s bench/post_sessions.lua
echo
if [ -n "${DATABASE_URL:-}" ]; then
  for pid in "${PIDS[@]}"; do echo "peak RSS of a host: $(awk '/VmHWM/ {printf "%.1f MB", $2/1024}' /proc/$pid/status)"; done
  exit 0
fi
size() { stat -c %s "$1" 2>/dev/null || echo 0; }
echo "after POST /sessions: WAL $(size "$TMP/hangar.db-wal") bytes beside a $(size "$TMP/hangar.db")-byte database (--wal-limit-mb 64)"
sleep 3
echo "after 3 s idle: WAL $(size "$TMP/hangar.db-wal") bytes"
echo "peak RSS of hangar: $(awk '/VmHWM/ {printf "%.1f MB", $2/1024}' /proc/${PIDS[0]}/status)"
if [ -n "${VERBOSE:-}" ]; then cat "$TMP"/*.txt; fi
