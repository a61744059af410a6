#!/usr/bin/env bash
# The test command: installs what the tests need, builds, checks format and
# lints, runs the unit tests of the core and the integration tests through the
# real Envoy. Exits non-zero on any failure. `.ci/run` calls exactly this.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

"$ROOT/scripts/setup.sh"
"$ROOT/scripts/build.sh"
cd "$ROOT"

plugins=()
for p in "${PLUGINS[@]}"; do plugins+=(-p "aigw-$p"); done

say "format"
cargo fmt --all --check
say "lints (host crates, then the plugins for wasm)"
cargo clippy --locked -p aigw-shared -p aigw-alloc -p aigw-tests -p aigw-ratelimit-service --all-targets -- -D warnings
cargo clippy --locked --target wasm32-wasip1 "${plugins[@]}" -p aigw-alloc -- -D warnings

say "unit tests (the core, the allocator, the harness, the mock)"
cargo test --locked -p aigw-shared -p aigw-alloc
cargo test --locked -p aigw-tests --lib --bins
say "integration tests (real Envoy, real .wasm, mock LLM): the separate filters"
cargo test --locked -p aigw-tests --test '*'
say "integration tests again: the same gateway as one module (the bundle)"
AIGW_SHAPE=bundle cargo test --locked -p aigw-tests --test '*'

say "the run command, as a user runs it"
python3 "$ROOT/tests/smoke_run.py"
