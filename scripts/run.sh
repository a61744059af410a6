#!/usr/bin/env bash
# The main command: starts the gateway (Envoy with the aigw filters, from
# envoy/gateway.yaml) on 127.0.0.1:${AIGW_PORT:-10000}, admin on
# ${AIGW_ADMIN_PORT:-9901}, in front of ${AIGW_UPSTREAM} — or of the built-in
# mock LLM when AIGW_UPSTREAM is unset. Ctrl-C stops everything it started.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

"$ROOT/scripts/setup.sh"
"$ROOT/scripts/build.sh"

port="${AIGW_PORT:-10000}"
admin_port="${AIGW_ADMIN_PORT:-9901}"
access_log="${AIGW_ACCESS_LOG:-$ROOT/logs/access.jsonl}"
mkdir -p "$(dirname "$access_log")"
work="$(mktemp -d)"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -z "${AIGW_UPSTREAM:-}" ]; then
  "$ROOT/target/release/mock-llm" --addr 127.0.0.1:0 >"$work/mock.out" &
  pids+=($!)
  for _ in $(seq 100); do grep -q listening "$work/mock.out" 2>/dev/null && break; sleep 0.05; done
  upstream="$(grep -o 'http://[^ ]*' "$work/mock.out")" || die "the mock LLM did not start"
  say "AIGW_UPSTREAM is not set: using the built-in mock LLM at $upstream"
else
  upstream="$AIGW_UPSTREAM"
fi

config="${AIGW_CONFIG:-$ROOT/envoy/gateway.yaml}"
[ -f "$config" ] || die "AIGW_CONFIG=$config: no such file"
"$ROOT/target/release/aigw-config" "$config" "$port" "$admin_port" \
  "$upstream" "$access_log" "$WASM_DIR" "${AIGW_UPSTREAM_CA:-}" >"$work/gateway.yaml"
"$ENVOY" -c "$work/gateway.yaml" --concurrency "${AIGW_CONCURRENCY:-2}" --disable-hot-restart \
  --file-flush-interval-msec 250 -l "${AIGW_LOG_LEVEL:-warning}" &
envoy_pid=$!
pids+=("$envoy_pid")

ready() {
  python3 - "$admin_port" <<'PY'
import sys, urllib.request
try:
    ok = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/ready", timeout=1).read().strip() == b"LIVE"
except Exception:
    ok = False
sys.exit(0 if ok else 1)
PY
}
for _ in $(seq 300); do
  ready && break
  kill -0 "$envoy_pid" 2>/dev/null || die "envoy exited while starting (see its log above)"
  sleep 0.1
done
ready || die "envoy did not become ready"

cat >&2 <<INFO

aigw is listening on http://127.0.0.1:$port  (upstream: $upstream)
  admin:       http://127.0.0.1:$admin_port   metrics: http://127.0.0.1:$admin_port/stats/prometheus
  access log:  $access_log

Try:
  curl -s http://127.0.0.1:$port/v1/chat/completions -H 'content-type: application/json' \\
    -H 'x-aigw-consumer: alice' \${OPENAI_API_KEY:+-H "authorization: Bearer \$OPENAI_API_KEY"} \\
    -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}'

Ctrl-C stops the gateway.
INFO
wait "$envoy_pid"
