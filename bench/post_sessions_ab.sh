#!/usr/bin/env bash
# Two builds side by side on POST /sessions: both servers run at once, and
# short wrk runs alternate between them (A then B, then B then A, ...), so a
# change of the machine's speed during the comparison hits both alike. The
# figure to quote is the median of the per-pair ratios B/A, not the req/s:
# this machine's speed moves ±25% over minutes.
#
#   bench/post_sessions_ab.sh BIN_A BIN_B [PAIRS=10] [SECONDS=4]
#
# A BIN may be a wrapper script that execs the real binary (with
# LD_PRELOAD or RUST_LOG set, say). Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
A=$1 B=$2 PAIRS=${3:-10} SECS=${4:-4}
HANGAR_BIN=$A source bench/common.sh
[ -x "$B" ] || { echo "not an executable: $B" >&2; exit 1; }
bench_tmp hangar-post-ab
mkdir -p "$TMP/work"

BIN=$A start_server a "$TMP/a.db"; BASE_A=$STARTED
BIN=$B start_server b "$TMP/b.db"; BASE_B=$STARTED
wait_ready "$BASE_A"; wait_ready "$BASE_B"
machine_line
one() { # base: req/s and p99 of one run
  WORK_DIR=$TMP/work wrk -t"$THREADS" -c"$CONNECTIONS" -d"${SECS}s" --latency -s bench/post_sessions.lua "$1/sessions" >"$TMP/run.txt"
  grep -qE 'Non-2xx|Socket errors' "$TMP/run.txt" && { echo "errors in a run:" >&2; cat "$TMP/run.txt" >&2; exit 1; }
  echo "$(awk '/^Requests\/sec/ {printf "%.0f", $2}' "$TMP/run.txt") $(awk '$1=="99%" {print $2}' "$TMP/run.txt")"
}
echo "| pair | A req/s | A p99 | B req/s | B p99 | B/A |"
echo "|---|---|---|---|---|---|"
for i in $(seq 1 "$PAIRS"); do
  if (( i % 2 )); then a=$(one "$BASE_A"); b=$(one "$BASE_B"); else b=$(one "$BASE_B"); a=$(one "$BASE_A"); fi
  set -- $a $b
  echo "| $i | $1 | $2 | $3 | $4 | $(awk -v x="$1" -v y="$3" 'BEGIN {printf "%.3f", y / x}') |"
done | tee "$TMP/pairs.md"
sort -t'|' -k7 -n "$TMP/pairs.md" | awk -F'|' '{r[NR]=$7} END {printf "median B/A over %d pairs: %.3f (min %.3f, max %.3f)\n", NR, (NR % 2 ? r[(NR+1)/2] : (r[NR/2] + r[NR/2+1]) / 2), r[1], r[NR]}'
