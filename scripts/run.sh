#!/usr/bin/env bash
# The main command: starts the gateway (Envoy with the aigw filters, from
# envoy/gateway.yaml) on 127.0.0.1:${AIGW_PORT:-10000}, admin on
# ${AIGW_ADMIN_PORT:-9901}, in front of ${AIGW_UPSTREAM} — or of the built-in
# mock LLM when AIGW_UPSTREAM is unset. AIGW_CONFIG=<an Envoy YAML> runs
# another configuration (any example under envoy/) in its place, with the
# same substitutions. Ctrl-C stops everything it started.
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
case "$config" in /*) ;; *) config="$PWD/$config" ;; esac
[ -f "$config" ] || die "AIGW_CONFIG: $config is not a file"
# A configuration with a rate limit service (envoy/rate-limit.yaml) gets
# one: AIGW_RATELIMIT=<host:port> of a service you run, or else a
# redis-server and the test rate limit service with envoy/ratelimit-service.yaml.
clusters=()
if grep -q '# aigw:cluster_ratelimit' "$config"; then
  if [ -n "${AIGW_RATELIMIT:-}" ]; then
    rls="$AIGW_RATELIMIT"
  else
    command -v redis-server >/dev/null || die "redis-server not found (./scripts/setup.sh installs it)"
    redis_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no >"$work/redis.out" &
    pids+=($!)
    "$ROOT/target/release/aigw-ratelimit-service" --addr 127.0.0.1:0 --redis "127.0.0.1:$redis_port" \
      --config "${AIGW_RATELIMIT_CONFIG:-$ROOT/envoy/ratelimit-service.yaml}" >"$work/rls.out" &
    pids+=($!)
    for _ in $(seq 100); do grep -q listening "$work/rls.out" 2>/dev/null && break; sleep 0.05; done
    rls="$(grep -o '127.0.0.1:[0-9]*' "$work/rls.out")" || die "the rate limit service did not start"
    say "AIGW_RATELIMIT is not set: using a rate limit service at $rls over redis-server on port $redis_port"
  fi
  clusters+=("ratelimit=$rls")
fi

"$ROOT/target/release/aigw-config" "$config" "$port" "$admin_port" \
  "$upstream" "$access_log" "$WASM_DIR" "${AIGW_UPSTREAM_CA:-}" "${clusters[@]}" >"$work/gateway.yaml"
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
