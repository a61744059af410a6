#!/usr/bin/env python3
"""Writes envoy/gateway-bundle.yaml from envoy/gateway.yaml.

The bundle is the same gateway as one module: every wasm filter of
gateway.yaml becomes a stage of the one `gateway` filter, its configuration
under its name (token-meter -> token_meter). Run it after changing
gateway.yaml; tests/tests/config.rs fails while the two differ.
Standard library only.
"""

import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HEADER = """# aigw: the full gateway as ONE wasm module (the bundle, target/wasm/gateway.wasm).
#
# GENERATED from envoy/gateway.yaml by scripts/bundle-yaml.py: edit that file
# and run the script. Each wasm filter there is a stage here, its
# configuration under its name, parsed by the same code. One VM context per
# request, one body read, facts in memory: choose it when you want the whole
# gateway; choose the separate modules of gateway.yaml to load one feature
# alone or to put your own filters between them.
#
# Run it with AIGW_CONFIG=envoy/gateway-bundle.yaml ./scripts/run.sh, or as it is with
#   envoy -c envoy/gateway-bundle.yaml --file-flush-interval-msec 250
# from the repository root, after ./scripts/build.sh.
"""

FILTER = """          - name: aigw.gateway
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: gateway
                root_id: gateway
                # Holds request headers while it reads the body; needs Envoy >= 1.35.
                allow_on_headers_stop_iteration: true
                # A trapped VM answers 503 once and is replaced.
                failure_policy: FAIL_RELOAD
                vm_config:
                  vm_id: aigw-gateway
                  runtime: envoy.wasm.runtime.v8
                  code:
                    local: { filename: target/wasm/gateway.wasm }  # aigw:wasm_dir
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: |
"""


def main():
    text = open(os.path.join(ROOT, "envoy/gateway.yaml")).read()
    lines = text.splitlines(keepends=True)
    # The header comment ends at the first blank line.
    body_start = next(i for i, l in enumerate(lines) if not l.strip())
    body = "".join(lines[body_start:])
    first = body.index("          - name: aigw.")
    router = body.index("          - name: envoy.filters.http.router\n")
    chain = body[first:router]
    stages = {}
    for block in re.split(r"(?m)^          - name: ", chain)[1:]:
        name = re.search(r"(?m)^                name: (\S+)", block).group(1)
        m = re.search(r"(?ms)^                  value: \|\n(.*)", block)
        config = json.loads(m.group(1)) if m and m.group(1).strip() else {}
        stages[name.replace("-", "_")] = config
    value = json.dumps(stages, indent=2)
    value = "".join("                    " + l + "\n" for l in value.splitlines())
    out = HEADER + body[:first] + FILTER + value + body[router:]
    path = os.path.join(ROOT, "envoy/gateway-bundle.yaml")
    if "--check" in sys.argv:
        same = os.path.exists(path) and open(path).read() == out
        print("gateway-bundle.yaml is up to date" if same else "gateway-bundle.yaml differs: run scripts/bundle-yaml.py")
        sys.exit(0 if same else 1)
    open(path, "w").write(out)


if __name__ == "__main__":
    main()
