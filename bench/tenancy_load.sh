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
source bench/common.sh
ROUNDS=${ROUNDS:-3}
ADMIN=bench-admin-token
bench_tmp hangar-tenancy-load
mkdir -p "$TMP/root"
tenant_key() { # base, name: a new tenant's key
  curl -fs -X POST "$1/tenants" -H "authorization: Bearer $ADMIN" -H 'content-type: application/json' \
    -d "{\"name\": \"$2\", \"quotas\": {}}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])'
}

start_server single "$TMP/single.db"
SINGLE=$STARTED
start_server multi "$TMP/multi.db" --admin-token "$ADMIN" --work-root "$TMP/root"
MULTI=$STARTED
wait_ready "$SINGLE"
wait_ready "$MULTI" -H "authorization: Bearer $ADMIN"
make_agents "$SINGLE"
KEY=$(tenant_key "$MULTI" bench)
OTHER=$(tenant_key "$MULTI" other)
make_agents "$MULTI" -H "authorization: Bearer $KEY"
make_agents "$MULTI" -H "authorization: Bearer $OTHER"
count() { python3 -c 'import json,sys; print(len(json.load(sys.stdin)))'; }
machine_line
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
