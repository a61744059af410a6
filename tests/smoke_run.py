#!/usr/bin/env python3
"""Smoke test of the README's run command, as a user runs it.

Starts ./scripts/run.sh (built-in mock LLM, free ports, its own access log),
sends a non-streaming and a streaming chat completion, and checks that each
produced one access-log line with the exact token counts the upstream
reported, that Prometheus shows them by model and consumer, and that Ctrl-C
(SIGINT to the process group) stops everything the command started.
Standard library only; prints "N passed, N failed" and exits non-zero on any
failure.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
passed, failed = 0, 0


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name}: {detail}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, body, consumer):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "x-aigw-consumer": consumer},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()


def lines_for(path, consumer, deadline):
    while time.time() < deadline:
        try:
            with open(path) as f:
                found = [json.loads(l) for l in f if l.strip()]
            found = [l for l in found if l.get("consumer") == consumer]
            if found:
                return found
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    return []


def start(work):
    """Starts run.sh on ports free a moment ago. run.sh takes real ports (users
    choose them), so another process may bind one in between: then Envoy
    exits with "address already in use", and this tries other ports."""
    for attempt in range(3):
        port, admin = free_port(), free_port()
        env = dict(os.environ, AIGW_PORT=str(port), AIGW_ADMIN_PORT=str(admin),
                   AIGW_ACCESS_LOG=os.path.join(work, "access.jsonl"))
        env.pop("AIGW_UPSTREAM", None)
        out = open(os.path.join(work, f"run-{attempt}.out"), "w")
        proc = subprocess.Popen(
            [os.path.join(ROOT, "scripts", "run.sh")], env=env, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        ready = False
        for _ in range(1200):  # up to 2 min: run.sh sets up and builds first
            if proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
                    ready = r.read().strip() == b"LIVE"
            except OSError:
                pass
            if ready:
                break
            time.sleep(0.1)
        text = open(out.name).read()
        if ready or proc.poll() is None or "already in use" not in text.lower():
            return proc, out, port, admin, ready
    return proc, out, port, admin, False


def main():
    work = tempfile.mkdtemp(prefix="aigw-smoke-")
    log = os.path.join(work, "access.jsonl")
    proc, out, port, admin, ready = start(work)
    try:
        check("run.sh starts the gateway", ready, open(out.name).read()[-2000:])
        if not ready:
            return

        prompt = [{"role": "user", "content": "count these five words"}]
        answer = json.loads(post(port, {"model": "gpt-4o-mini", "messages": prompt}, "smoke-json"))
        reported = answer.get("usage", {})
        stream = post(port, {"model": "gpt-4o-mini", "stream": True, "messages": prompt}, "smoke-stream")
        check("the stream reaches the client without the added usage chunk",
              "[DONE]" in stream and '"usage"' not in stream, stream[-300:])

        deadline = time.time() + 5
        for consumer, stream_flag in (("smoke-json", False), ("smoke-stream", True)):
            lines = lines_for(log, consumer, deadline)
            check(f"{consumer}: one access-log line", len(lines) == 1, lines)
            if len(lines) != 1:
                continue
            line = lines[0]
            want = (reported.get("prompt_tokens"), reported.get("completion_tokens"), "provider", stream_flag)
            got = (line.get("input_tokens"), line.get("output_tokens"), line.get("usage_source"), line.get("stream"))
            check(f"{consumer}: exact tokens as the upstream reported", got == want and None not in want,
                  f"got {got}, want {want}")

        # The meter hands its counters to Envoy once a second.
        for consumer in ("smoke-json", "smoke-stream"):
            series = f'aigw_tokens_total{{model="gpt-4o-mini",consumer="{consumer}",token_type="output"}}'
            value = None
            for _ in range(50):
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats/prometheus", timeout=5) as r:
                    metrics = r.read().decode()
                value = next((l.split()[-1] for l in metrics.splitlines() if l.startswith(series)), None)
                if value is not None and float(value) == reported.get("completion_tokens"):
                    break
                time.sleep(0.1)
            check(f"{consumer}: output tokens in Prometheus by model and consumer",
                  value is not None and float(value) == reported.get("completion_tokens"), value)
    finally:
        # Ctrl-C: SIGINT to the whole foreground group, as a terminal sends it.
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        time.sleep(0.5)
        left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
        check("Ctrl-C stops everything run.sh started", proc.poll() is not None and not left, left)
        if left:
            os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
    print(f"smoke: {passed} passed, {failed} failed")
    sys.exit(1 if failed or not passed else 0)
