# Shared by the scripts: where things are, and the pinned versions.
# shellcheck shell=bash
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENVOY_VERSION="1.40.0"
TOOLS="$ROOT/.tools"
ENVOY_DIR="$TOOLS/envoy-$ENVOY_VERSION"
ENVOY="$ENVOY_DIR/envoy/_bin/envoy"
WASM_DIR="$ROOT/target/wasm"
PLUGINS=(token-meter rate-limit prompt-cache model-router content-screen gateway)
export AIGW_ENVOY="$ENVOY" AIGW_WASM_DIR="$WASM_DIR" AIGW_ROOT="$ROOT"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
