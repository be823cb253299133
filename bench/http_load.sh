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
BIN=${HANGAR_BIN:-target/release/hangar}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
AGENTS=${AGENTS:-20}
[ -x "$BIN" ] || { echo "build first: cargo bench --no-run  (missing $BIN)" >&2; exit 1; }
command -v wrk >/dev/null || { echo "install wrk (apt-get install -y wrk)" >&2; exit 1; }

TMP=$(mktemp -d /tmp/hangar-http-load.XXXXXX)
HOSTS=${HOSTS:-1}
DB=${DATABASE_URL:-$TMP/hangar.db}
mkdir -p "$TMP/work"
PIDS=()
BASES=()
trap 'kill "${PIDS[@]}" 2>/dev/null; wait "${PIDS[@]}" 2>/dev/null; rm -rf "$TMP"' EXIT
for h in $(seq 1 "$HOSTS"); do
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  XDG_CONFIG_HOME=$TMP/config XDG_DATA_HOME=$TMP/data$h RUST_LOG=${RUST_LOG:-info} \
    HANGAR_SECRET_KEY=0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c \
    "$BIN" serve --port "$PORT" --db "$DB" --cache-dir /tmp/hangar-bench-compile-cache \
    --plugins "$TMP/plugins" 2>"$TMP/server$h.log" &
  PIDS+=($!)
  BASES+=("http://127.0.0.1:$PORT")
done
BASE=${BASES[0]}
for base in "${BASES[@]}"; do
  for _ in $(seq 1 600); do curl -fs "$base/health" >/dev/null && break; sleep 0.05; done
  # Wait until the built-in plugins are compiled, so the load does not race compilation.
  for _ in $(seq 1 1200); do curl -fs "$base/plugins" | grep -q '"compiling"' || break; sleep 0.1; done
done
for i in $(seq 1 "$AGENTS"); do
  curl -fs -X POST "$BASE/agents" -H 'content-type: application/json' \
    -d "{\"name\": \"agent-$i\", \"instructions\": \"You help with task $i.\", \"tools\": [\"read\", \"grep\"], \"provider\": {\"id\": \"anthropic\", \"model\": \"claude-test\"}}" >/dev/null
done
echo "machine: $(nproc) cpus, $(lscpu | sed -n 's/^Model name: *//p'); loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
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
