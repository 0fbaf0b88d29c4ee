"""A goroutine the Go runtime itself marks leaked (_Gleaked) is exported at once, with error status.

The runtime's goroutine-leak detection runs in a garbage collection that the goroutineleak profile asks
for: an experiment in Go 1.26 (GOEXPERIMENT=goroutineleakprofile), built in from Go 1.27 (the Go
releases of the matrix before 1.26 have no such state). tests/programs/leaker leaks a goroutine on a
channel nothing else reaches, collects the profile until the runtime counts the leak, writes its
manifest and waits for SIGTERM. The agent runs with no periodic scan at all (--checkpoint-after 0
--leak-after 0): the span must come, while the program still runs, from the runtime's mark alone."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from helpers import AGENT, build_program, by_goid, go_release, poll, site_line, spans_from_otlp_json

pytestmark = pytest.mark.ebpf

BUILDS = {"1.26": "goroutineleakprofile", "1.27": ""}  # Go minor -> GOEXPERIMENT it needs


@pytest.mark.parametrize("go", BUILDS, ids=lambda go: f"go{go}")
def test_runtime_marked_leak_exported_at_once_with_error_status(go, tmp_path):
    binary = build_program("leaker", go=go_release(go), goexperiment=BUILDS[go])
    manifest_path, spans_path = tmp_path / "manifest.json", tmp_path / "spans.jsonl"
    agent = subprocess.Popen(AGENT + ["run", "--exporter", "file", "--output", str(spans_path), "-q",
                                      "--checkpoint-after", "0", "--leak-after", "0", "--",
                                      str(binary), str(manifest_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert poll(manifest_path.exists, 60), "the leaker never wrote its manifest"
        manifest = json.loads(manifest_path.read_text())
        assert manifest["profile"] and manifest["leaks"] == 1, manifest  # the runtime found it
        leaked = manifest["goroutines"][0]["goid"]
        flagged = lambda: spans_path.exists() and any(
            s.attributes["go.goroutine.id"] == leaked and s.status_code == 2 for s in spans_from_otlp_json(spans_path))
        assert poll(flagged, 30, every=0.2), "no error span for the leaked goroutine while the program ran"
        assert agent.poll() is None  # the program still runs: it waits for SIGTERM
    finally:
        agent.send_signal(signal.SIGTERM)  # forwarded to the program, which exits
        _, err = agent.communicate(timeout=30)
    assert agent.returncode == 0, err
    spans = [s for s in spans_from_otlp_json(spans_path) if s.attributes["go.goroutine.id"] == leaked]
    checkpoint, final = sorted(spans, key=lambda s: "go.goroutine.partial" not in s.attributes)
    for span in (checkpoint, final):
        assert span.name == "main.leak" and span.status_code == 2  # STATUS_CODE_ERROR
        assert span.attributes["go.goroutine.leak_suspected"] is True
        assert span.attributes["code.line.number"] == site_line("leaker", "leak")
    assert checkpoint.attributes["go.goroutine.partial"] is True
    (event,) = [a for name, _, a in checkpoint.events if name == "leak_suspected"]
    assert event["go.goroutine.leak.reason"] == "the Go runtime marked it leaked"
    assert event["go.goroutine.wait_reason"] == "chan receive"
    assert final.attributes["go.goroutine.end_reason"] == "process_exited"
    others = by_goid([s for s in spans_from_otlp_json(spans_path) if s.attributes["go.goroutine.id"] != leaked])
    assert not [s for s in others.values() if s.status_code == 2]  # only the leak is an error
