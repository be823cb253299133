#!/usr/bin/env bash
# Tenancy overhead (issue 21): GET /agents at 64 connections (wrk, as figure 3)
# on a single-user server and, with a tenant key, on a multi-tenant one
# (--admin-token), each listing the same AGENTS agents (default 20). The
# multi-tenant server also holds a second tenant's AGENTS agents, which the
# key must not see. Both servers run side by side; the wrk runs alternate,
# ROUNDS of each (default 3).
#
#   cargo bench --no-run && bench/tenancy_load.sh     # DURATION=10s CONNECTIONS=64 THREADS=2
#
# Uses the release binary built by `cargo bench --no-run` (target/release/hangar,
# or HANGAR_BIN). Loopback only. The servers and wrk share the machine: note its load.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${HANGAR_BIN:-target/release/hangar}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
AGENTS=${AGENTS:-20}
ROUNDS=${ROUNDS:-3}
ADMIN=bench-admin-token
[ -x "$BIN" ] || { echo "build first: cargo bench --no-run  (missing $BIN)" >&2; exit 1; }
command -v wrk >/dev/null || { echo "install wrk (apt-get install -y wrk)" >&2; exit 1; }

TMP=$(mktemp -d /tmp/hangar-tenancy-load.XXXXXX)
mkdir -p "$TMP/root"
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; wait "${PIDS[@]}" 2>/dev/null; rm -rf "$TMP"' EXIT
start() { # name, extra args...: starts a server; its base URL in $STARTED
  local name=$1; shift
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  XDG_CONFIG_HOME=$TMP/config-$name XDG_DATA_HOME=$TMP/data-$name RUST_LOG=${RUST_LOG:-info} \
    HANGAR_SECRET_KEY=0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c \
    "$BIN" serve --port "$port" --db "$TMP/$name.db" --cache-dir /tmp/hangar-bench-compile-cache \
    --plugins "$TMP/plugins-$name" "$@" >/dev/null 2>"$TMP/$name.log" &
  PIDS+=($!)
  STARTED="http://127.0.0.1:$port"
}
ready() { # base, curl args...
  local base=$1; shift
  for _ in $(seq 1 600); do curl -fs "$@" "$base/agents" >/dev/null && break; sleep 0.05; done
  for _ in $(seq 1 1200); do curl -fs "$@" "$base/plugins" | grep -q '"compiling"' || break; sleep 0.1; done
}
agents() { # base, curl args...: AGENTS agents
  local base=$1; shift
  for i in $(seq 1 "$AGENTS"); do
    curl -fs -X POST "$base/agents" "$@" -H 'content-type: application/json' \
      -d "{\"name\": \"agent-$i\", \"instructions\": \"You help with task $i.\", \"tools\": [\"read\", \"grep\"], \"provider\": {\"id\": \"anthropic\", \"model\": \"claude-test\"}}" >/dev/null
  done
}
tenant_key() { # base, name: a new tenant's key
  curl -fs -X POST "$1/tenants" -H "authorization: Bearer $ADMIN" -H 'content-type: application/json' \
    -d "{\"name\": \"$2\", \"quotas\": {}}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])'
}

start single
SINGLE=$STARTED
start multi --admin-token "$ADMIN" --work-root "$TMP/root"
MULTI=$STARTED
ready "$SINGLE"
ready "$MULTI" -H "authorization: Bearer $ADMIN"
agents "$SINGLE"
KEY=$(tenant_key "$MULTI" bench)
OTHER=$(tenant_key "$MULTI" other)
agents "$MULTI" -H "authorization: Bearer $KEY"
agents "$MULTI" -H "authorization: Bearer $OTHER"
count() { python3 -c 'import json,sys; print(len(json.load(sys.stdin)))'; }
echo "machine: $(nproc) cpus, $(lscpu | sed -n 's/^Model name: *//p'); loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
echo "GET /agents: single-user $(curl -fs "$SINGLE/agents" | count) agents, tenant key $(curl -fs -H "authorization: Bearer $KEY" "$MULTI/agents" | count) agents (of $(curl -fs -H "authorization: Bearer $ADMIN" "$MULTI/agents" | count) on the server)"

run() { # name, base, wrk args...
  local name=$1 base=$2; shift 2
  local out=$TMP/wrk.txt
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$@" "$base/agents" >"$out"
  local errs
  errs=$(grep -E 'Non-2xx|Socket errors' "$out" | tr '\n' ' ' || true)
  printf '| %s | %s | %s | %s | %s | %s |\n' "$ROUND" "$name" \
    "$(awk '/^Requests\/sec/ {printf "%.0f", $2}' "$out")" "$(awk '$1=="50%" {print $2}' "$out")" \
    "$(awk '$1=="99%" {print $2}' "$out")" "${errs:-none}"
}
echo
echo "| round | GET /agents ($AGENTS agents) | req/s | p50 | p99 | errors |"
echo "|---|---|---|---|---|---|"
for ROUND in $(seq 1 "$ROUNDS"); do
  run "single-user" "$SINGLE"
  run "tenant key (multi-tenant)" "$MULTI" -H "Authorization: Bearer $KEY"
done
echo
echo "loadavg after: $(cut -d' ' -f1-3 /proc/loadavg)"
