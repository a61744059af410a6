#!/usr/bin/env bash
# Prints the SHA-256 digest of an API key, as the rate-limit filter's
# `identity.api_keys` table holds it (so the configuration never holds the key).
#   ./scripts/key-digest.sh sk-alice-123        or   echo -n sk-alice-123 | ./scripts/key-digest.sh
set -euo pipefail
if [ $# -ge 1 ]; then key="$1"; else key="$(cat)"; fi
# Surrounding whitespace is not part of a key (the filter trims what clients send).
key="${key#"${key%%[![:space:]]*}"}"; key="${key%"${key##*[![:space:]]}"}"
printf '%s' "$key" | sha256sum | cut -d' ' -f1
