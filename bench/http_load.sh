#!/usr/bin/env bash
# Figure 3: GET /agents and POST /sessions at 64 connections, with wrk.
#
#   bench/http_load.sh            # DURATION=10s CONNECTIONS=64 THREADS=2 by default
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
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$TMP/work"
XDG_CONFIG_HOME=$TMP/config XDG_DATA_HOME=$TMP/data RUST_LOG=${RUST_LOG:-info} \
  "$BIN" serve --port "$PORT" --db "$TMP/hangar.db" --cache-dir /tmp/hangar-bench-compile-cache \
  --plugins "$TMP/plugins" 2>"$TMP/server.log" &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$TMP"' EXIT
BASE=http://127.0.0.1:$PORT
for _ in $(seq 1 600); do curl -fs "$BASE/health" >/dev/null && break; sleep 0.05; done
# Wait until the built-in plugins are compiled, so the load does not race compilation.
for _ in $(seq 1 1200); do curl -fs "$BASE/plugins" | grep -q '"compiling"' || break; sleep 0.1; done
for i in $(seq 1 "$AGENTS"); do
  curl -fs -X POST "$BASE/agents" -H 'content-type: application/json' \
    -d "{\"name\": \"agent-$i\", \"instructions\": \"You help with task $i.\", \"tools\": [\"read\", \"grep\"], \"provider\": {\"id\": \"anthropic\", \"model\": \"claude-test\"}}" >/dev/null
done
echo "machine: $(nproc) cpus, $(lscpu | sed -n 's/^Model name: *//p'); loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
echo "GET /agents returns $(curl -fs "$BASE/agents" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))') agents"

run() { # name, wrk args...
  local name=$1; shift
  local out; out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$@")
  echo "$out" >"$TMP/${name//[^a-zA-Z]/_}.txt"
  local rps p50 p99 errs
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  errs=$(grep -E 'Non-2xx|Socket errors' <<<"$out" | tr '\n' ' ' || true)
  printf '| %s | %s | %s | %s | %s | %s |\n' "$name" "$CONNECTIONS" "$rps" "$p50" "$p99" "${errs:-none}"
}
echo
echo "| request | connections | req/s | p50 | p99 | errors |"
echo "|---|---|---|---|---|---|"
run "GET /agents" "$BASE/agents"
WORK_DIR=$TMP/work run "POST /sessions" -s bench/post_sessions.lua "$BASE/sessions"
echo
size() { stat -c %s "$1" 2>/dev/null || echo 0; }
echo "after POST /sessions: WAL $(size "$TMP/hangar.db-wal") bytes beside a $(size "$TMP/hangar.db")-byte database (--wal-limit-mb 64)"
sleep 3
echo "after 3 s idle: WAL $(size "$TMP/hangar.db-wal") bytes"
echo "peak RSS of hangar: $(awk '/VmHWM/ {printf "%.1f MB", $2/1024}' /proc/$PID/status)"
if [ -n "${VERBOSE:-}" ]; then cat "$TMP"/*.txt; fi
