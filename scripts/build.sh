#!/usr/bin/env bash
# Builds every plugin's .wasm in release mode into target/wasm/<plugin>.wasm,
# and the host binaries (mock LLM, runner, the tests' rate limit service) the
# README's commands and the tests use.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

args=()
for p in "${PLUGINS[@]}"; do args+=(-p "aigw-$p"); done
say "building wasm plugins (release)"
cargo build --release --locked --target wasm32-wasip1 "${args[@]}"
mkdir -p "$WASM_DIR"
for p in "${PLUGINS[@]}"; do
  cp "target/wasm32-wasip1/release/aigw_${p//-/_}.wasm" "$WASM_DIR/$p.wasm"
done
say "building the mock LLM, the runner and the test rate limit service"
# The rate limit service (tonic, for the global-mode tests) is a host binary:
# it never enters the wasm build above.
cargo build --release --locked -p aigw-tests --bins -p aigw-ratelimit-service
ls -l "$WASM_DIR" | awk 'NR>1 {printf "    %-22s %8d bytes\n", $9, $5}' >&2
