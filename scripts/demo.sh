#!/usr/bin/env bash
# Builds the demo Go program and traces it: spans go to demo-spans.jsonl (OTLP/JSON), and a
# summary of the goroutines seen is printed. No collector or other service is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
go=$(scripts/go-toolchain.sh)
(cd demo && GOTOOLCHAIN=local GOFLAGS=-mod=mod "$go" build -o demo .)
echo "demo: tracing demo/demo with otel-goroutines"
.venv/bin/otel-goroutines run --exporter file --output demo-spans.jsonl -- demo/demo
echo
echo "demo: one request's goroutines, read back from demo-spans.jsonl (OTLP/JSON, one export request per line):"
.venv/bin/python - <<'PY'
import json
spans = [s for line in open("demo-spans.jsonl") for rs in json.loads(line)["resourceSpans"]
         for ss in rs["scopeSpans"] for s in ss["spans"]]
attr = lambda s, k: next((next(iter(a["value"].values())) for a in s["attributes"] if a["key"] == k), None)
children = {}
for s in spans:
    children.setdefault(s.get("parentSpanId", ""), []).append(s)
def show(s, depth):
    ms = (int(s["endTimeUnixNano"]) - int(s["startTimeUnixNano"])) / 1e6
    waits = [next(iter(a["value"].values())) for e in s.get("events", []) for a in e.get("attributes", []) if a["key"] == "go.goroutine.wait_reason"]
    print(f"{'  ' * depth}{s['name']}  goroutine {attr(s, 'go.goroutine.id')}  {ms:.2f} ms  "
          f"created at {attr(s, 'code.file.path').split('/')[-1]}:{attr(s, 'code.line.number')}  waited on: {', '.join(dict.fromkeys(waits)) or '-'}")
    for c in children.get(s["spanId"], []):
        show(c, depth + 1)
show(next(s for s in spans if s["name"] == "main.handle"), 1)
PY
