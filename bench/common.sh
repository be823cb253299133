# Shared by the wrk benches (http_load.sh, tenancy_load.sh): settings, the
# tools they need, and starting a server. Sourced, not run; the caller has
# `set -euo pipefail` and is in the repository root.
#
# Settings (environment): HANGAR_BIN (default target/release/hangar, built
# by `cargo bench --no-run`), DURATION (10s), CONNECTIONS (64), THREADS (2),
# AGENTS (20), RUST_LOG (info).

BIN=${HANGAR_BIN:-target/release/hangar}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
AGENTS=${AGENTS:-20}
[ -x "$BIN" ] || { echo "build first: cargo bench --no-run  (missing $BIN)" >&2; exit 1; }
command -v wrk >/dev/null || { echo "install wrk (apt-get install -y wrk)" >&2; exit 1; }

# The caller's scratch directory ($1, made here) goes with the servers on exit.
bench_tmp() {
  TMP=$(mktemp -d "/tmp/$1.XXXXXX")
  PIDS=()
  trap 'kill "${PIDS[@]}" 2>/dev/null; wait "${PIDS[@]}" 2>/dev/null; rm -rf "$TMP"' EXIT
}

# start_server NAME DB [serve args…]: a server on a free loopback port, its
# state under $TMP (config-NAME, data-NAME, plugins-NAME, NAME.log); its
# base URL in $STARTED, its pid appended to PIDS.
start_server() {
  local name=$1 db=$2; shift 2
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  XDG_CONFIG_HOME=$TMP/config-$name XDG_DATA_HOME=$TMP/data-$name RUST_LOG=${RUST_LOG:-info} \
    HANGAR_SECRET_KEY=0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c \
    "$BIN" serve --port "$port" --db "$db" --cache-dir /tmp/hangar-bench-compile-cache \
    --plugins "$TMP/plugins-$name" "$@" >/dev/null 2>"$TMP/$name.log" &
  PIDS+=($!)
  STARTED="http://127.0.0.1:$port"
}

# wait_ready BASE [curl args…]: up, and the built-in plugins ready, so the
# load does not race their loading.
wait_ready() {
  local base=$1; shift
  for _ in $(seq 1 600); do curl -fs "$@" "$base/agents" >/dev/null && break; sleep 0.05; done
  for _ in $(seq 1 1200); do curl -fs "$@" "$base/plugins" | grep -q '"compiling"' || break; sleep 0.1; done
}

# make_agents BASE [curl args…]: AGENTS agents, as every figure lists them.
make_agents() {
  local base=$1; shift
  for i in $(seq 1 "$AGENTS"); do
    curl -fs -X POST "$base/agents" "$@" -H 'content-type: application/json' \
      -d "{\"name\": \"agent-$i\", \"instructions\": \"You help with task $i.\", \"tools\": [\"read\", \"grep\"], \"provider\": {\"id\": \"anthropic\", \"model\": \"claude-test\"}}" >/dev/null
  done
}

machine_line() {
  echo "machine: $(nproc) cpus, $(lscpu | sed -n 's/^Model name: *//p'); loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
}
