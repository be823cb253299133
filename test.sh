#!/usr/bin/env bash
# Runs every test of Hangar on a fresh machine: installs what the machine
# lacks (quietly; nothing is reinstalled when present), then runs the whole
# suite. `.ci/run` calls exactly this.
#
# With CI set (as this script sets it), a test whose tool is missing fails
# instead of skipping.
set -euo pipefail
cd "$(dirname "$0")"

say() { printf '==> %s\n' "$*" >&2; }

# The toolchain is pinned by rust-toolchain.toml; the built-in plugins need
# its wasm32-wasip2 target.
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    say "adding the wasm32-wasip2 target"
    rustup target add wasm32-wasip2
fi

# Debian packages the tests run: bash, util-linux's unshare and setpriv
# (confined commands, and the fuzzer's private network), capsh and ip
# (tests that try what a command may do), curl (commands that try the
# server's own API), python3 with pip, node with npm (the JavaScript plugin
# template), chromium with its chromedriver (the console's browser test).
declare -A debian=(
    [bash]=bash [unshare]=util-linux [setpriv]=util-linux [capsh]=libcap2-bin
    [ip]=iproute2 [curl]=curl [python3]=python3 [node]=nodejs [npm]=npm
    [chromium]=chromium [chromedriver]=chromium-driver
)
missing=()
for command in "${!debian[@]}"; do
    command -v "$command" >/dev/null || missing+=("${debian[$command]}")
done
if ! python3 -m pip --version >/dev/null 2>&1; then missing+=(python3-pip); fi
# PostgreSQL 15 (the store's second backend), unless the tests are given one.
PG_BIN=/usr/lib/postgresql/15/bin
if [ -z "${HANGAR_TEST_DATABASE_URL:-}" ] && [ ! -x "$PG_BIN/initdb" ]; then missing+=(postgresql); fi
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
fi

# The Python example plugin is built with componentize-py (pinned: its
# output must match the WIT the host speaks).
COMPONENTIZE_PY=0.25.1
if [ "$(componentize-py --version 2>/dev/null)" != "componentize-py $COMPONENTIZE_PY" ]; then
    say "installing componentize-py $COMPONENTIZE_PY"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "componentize-py==$COMPONENTIZE_PY" \
        || python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --break-system-packages "componentize-py==$COMPONENTIZE_PY"
    # Where Python comes from pyenv, its shims learn of the new command this way.
    if command -v pyenv >/dev/null; then pyenv rehash; fi
fi
command -v componentize-py >/dev/null || { say "componentize-py is still not on PATH"; exit 1; }

# The JavaScript plugin template is built with jco and componentize-js
# (pinned together: jco 1.35.0 cannot read a WIT directory here).
JCO=1.34.0
COMPONENTIZE_JS=0.23.0
if [ "$(jco --version 2>/dev/null)" != "$JCO" ] \
    || ! npm ls -g --depth=0 "@bytecodealliance/componentize-js@$COMPONENTIZE_JS" >/dev/null 2>&1; then
    say "installing jco $JCO and componentize-js $COMPONENTIZE_JS"
    npm install -g --silent --no-fund --no-audit "@bytecodealliance/jco@$JCO" "@bytecodealliance/componentize-js@$COMPONENTIZE_JS" >/dev/null
fi
command -v jco >/dev/null || { say "jco is still not on PATH"; exit 1; }
# Schemathesis fuzzes the API against its own OpenAPI document (pinned:
# its checks change between releases).
SCHEMATHESIS=4.32.5
if [ "$(python3 -m pip show schemathesis 2>/dev/null | sed -n 's/^Version: //p')" != "$SCHEMATHESIS" ]; then
    say "installing schemathesis $SCHEMATHESIS"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "schemathesis==$SCHEMATHESIS" \
        || python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --break-system-packages "schemathesis==$SCHEMATHESIS"
    if command -v pyenv >/dev/null; then pyenv rehash; fi
fi
command -v st >/dev/null || { say "schemathesis (st) is still not on PATH"; exit 1; }

# The metrics test reads `GET /metrics` with the reference Prometheus
# client's text parser.
PROMETHEUS_CLIENT=0.26.0
if [ "$(python3 -m pip show prometheus-client 2>/dev/null | sed -n 's/^Version: //p')" != "$PROMETHEUS_CLIENT" ]; then
    say "installing prometheus-client $PROMETHEUS_CLIENT"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "prometheus-client==$PROMETHEUS_CLIENT" \
        || python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --break-system-packages "prometheus-client==$PROMETHEUS_CLIENT"
fi

# The MCP test drives `/sessions/{id}/mcp` with the official MCP Python SDK
# (pinned: the protocol moves between releases).
MCP=2.3.0
if [ "$(python3 -m pip show mcp 2>/dev/null | sed -n 's/^Version: //p')" != "$MCP" ]; then
    say "installing mcp $MCP"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "mcp==$MCP" \
        || python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --break-system-packages "mcp==$MCP"
fi
# An MCP stdio server runs confined like `bash`, where the command `PATH`
# holds only system directories: the system's python3 needs the SDK too.
if [ "$(/usr/bin/python3 -m pip show mcp 2>/dev/null | sed -n 's/^Version: //p')" != "$MCP" ]; then
    say "installing mcp $MCP for /usr/bin/python3"
    /usr/bin/python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --break-system-packages "mcp==$MCP"
fi

# A throwaway PostgreSQL for the tests of the PostgreSQL backend (each test
# makes a database of its own in it), unless HANGAR_TEST_DATABASE_URL names
# a server already. It listens on loopback only, on a free port, with its
# socket in its own directory, trusting loopback connections; fsync is off
# since nothing in it outlives the run. Stopped and removed on exit.
if [ -z "${HANGAR_TEST_DATABASE_URL:-}" ]; then
    # initdb refuses to run as root: root runs it as the `postgres` user.
    as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
    pg_dir=$(mktemp -d "${TMPDIR:-/tmp}/hangar-pg.XXXXXX")
    if [ "$(id -u)" -eq 0 ]; then chown postgres: "$pg_dir"; fi
    trap 'as_pg "$PG_BIN/pg_ctl" -D "$pg_dir/data" stop -m immediate >/dev/null 2>&1 || true; rm -rf "$pg_dir"' EXIT
    pg_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_pg "$PG_BIN/initdb" -D "$pg_dir/data" -U postgres --auth=trust --encoding=UTF8 --no-sync >"$pg_dir/initdb.log" \
        || { cat "$pg_dir/initdb.log" >&2; exit 1; }
    as_pg "$PG_BIN/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/server.log" -w start \
        -o "-c listen_addresses=127.0.0.1 -p $pg_port -k $pg_dir -c fsync=off -c max_connections=400" >/dev/null \
        || { cat "$pg_dir/server.log" >&2; exit 1; }
    export HANGAR_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$pg_port/postgres"
    say "PostgreSQL 15 for the tests on 127.0.0.1:$pg_port"
fi

# Every test; none may skip for a missing tool.
export CI="${CI:-true}"
# The SDK's own unit tests, natively, once per world (its two features
# exclude each other); the plugins built from it run under the tests below.
cargo test --manifest-path sdk/Cargo.toml --features tool
cargo test --manifest-path sdk/Cargo.toml --features provider
cargo test --workspace "$@"
