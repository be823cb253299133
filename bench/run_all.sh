#!/usr/bin/env bash
# Every figure of BENCHMARKS.md, in order, into bench/results-<date>.md (not committed).
#   bench/run_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results-$(date -u +%Y%m%dT%H%M%SZ).md}
{
  echo "# run of $(git rev-parse --short HEAD) on $(nproc) cpus, $(lscpu | sed -n 's/^Model name: *//p'), $(free -g | awk '/Mem:/ {print $2}') GB"
  cargo bench --bench read_call -- --percentiles-only
  cargo bench --bench grep_tree
  bench/http_load.sh
  bench/tenancy_load.sh
  cargo bench --bench streams
  cargo bench --bench features
  cargo bench --bench cold_start
} 2>&1 | tee "$OUT"
