#!/usr/bin/env bash
# Benchmark: Envoy CPU per request, throughput and latency of the gateway
# against bare Envoy. Prints a table with ratios. Not part of the tests
# (timing is not a test); run it when you touch a hot path and put the table
# in your issue note. Arguments go to aigw-bench (--seconds N, --connections N).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
"$ROOT/scripts/setup.sh"
"$ROOT/scripts/build.sh"
cd "$ROOT"
exec "$ROOT/target/release/aigw-bench" "$@"
