"""What the README promises about options, exporters and the standard OTEL_* variables, checked on
real probes: the tree and ticker fixtures traced by `run`, their spans compared with what the
programs recorded about themselves (tests/programs/tree, tests/programs/ticker).

- `--detail lifecycle`: creation and exit only, no state events, no per-state times;
- `--max-events N`: N state events kept per span, the rest counted exactly in events_left_out;
- `--exporter console`: one readable line per goroutine;
- OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_HEADERS, OTEL_RESOURCE_ATTRIBUTES, as an
  OTLP/HTTP receiver sees them;
- the default spawner threshold: a creator's first 16 children join its trace, the 17th on start
  traces of their own.
"""

from __future__ import annotations

import json
import re

import pytest

from helpers import by_goid, free_port, of_run, run_agent, run_marker, site_line, spans_from_otlp_json

pytestmark = pytest.mark.ebpf


def _run_tree(programs, tmp_path, *args, env=None):
    """Trace the tree fixture with ARGS; (agent run, the program's manifest)."""
    manifest_path = tmp_path / "manifest.json"
    run = run_agent(["run", "-q", *args, "--", str(programs["tree"]), str(manifest_path)], env=env)
    assert run.returncode == 0, run.stderr
    return run, json.loads(manifest_path.read_text())


def _to_file(programs, tmp_path, *args):
    out = tmp_path / "spans.jsonl"
    run, manifest = _run_tree(programs, tmp_path, "--exporter", "file", "--output", str(out), *args)
    return run, manifest, by_goid(spans_from_otlp_json(out))


def _assert_tree(manifest, spans):
    """Every goroutine the program started has its span: name, parent, creation site, life within
    the program's own clock readings, and how it ended."""
    for g in manifest["goroutines"]:
        span = spans[g["goid"]]
        assert span.name == g["func"], g
        assert span.attributes["go.goroutine.parent_id"] == g["parent"]
        assert span.parent_span_id == spans[g["parent"]].span_id
        assert span.attributes["code.line.number"] == site_line("tree", g["site"])
        assert g["spawned"] <= span.start_ns <= g["started"], g
        alive = g["func"] == "main.stuck"
        if not alive:  # joined: once the program saw them all finish exiting
            assert g["joined"] and g["ended"] <= span.end_ns <= g["joined"], g
        assert span.attributes["go.goroutine.end_reason"] == ("process_exited" if alive else "exited")


def test_detail_lifecycle_has_no_state_events_or_times(programs, tmp_path):
    _, manifest, spans = _to_file(programs, tmp_path, "--detail", "lifecycle")
    _assert_tree(manifest, spans)
    for span in spans.values():
        # The end is the only event; no state names, wait reasons, per-state times or counts.
        assert [(name, t) for name, t, _ in span.events] == [(span.attributes["go.goroutine.end_reason"], span.end_ns)]
        state_keys = [k for k in span.attributes if k.endswith("_ns") or k in
                      ("go.goroutine.transitions", "go.goroutine.events_left_out")]
        assert state_keys == [], (span.name, state_keys)


@pytest.mark.parametrize("max_events", [0, 3])
def test_max_events_keeps_that_many_and_counts_the_rest(programs, tmp_path, max_events):
    _, manifest, spans = _to_file(programs, tmp_path, "--max-events", str(max_events))
    _assert_tree(manifest, spans)
    for span in spans.values():
        attrs = span.attributes
        *states, end = span.events
        assert end[0] == attrs["go.goroutine.end_reason"]
        assert len(states) == min(max_events, attrs["go.goroutine.transitions"]), span.name
        assert attrs["go.goroutine.events_left_out"] == attrs["go.goroutine.transitions"] - len(states)
        # The per-state times still cover every transition, kept as an event or not.
        assert sum(v for k, v in attrs.items() if k.endswith("_ns")) == span.end_ns - span.start_ns
    # A leaf runs, waits on its channel, becomes runnable and runs again before it exits: at least 4
    # transitions, so some were left out, whatever the limit here.
    for g in manifest["goroutines"]:
        if g["func"] in ("main.leaf", "main.worker"):
            attrs = spans[g["goid"]].attributes
            assert attrs["go.goroutine.transitions"] >= 4
            assert attrs["go.goroutine.events_left_out"] == attrs["go.goroutine.transitions"] - max_events


CONSOLE_LINE = re.compile(r"^goroutine (\d+)(?: parent=(\d+)(?: \([a-z ]+\))?| \(root\)) (\S+) [\d.]+ ms, created at (.*):(\d+|\?), (\w+)$")


def test_console_exporter_prints_one_line_per_goroutine(programs, tmp_path):
    run, manifest = _run_tree(programs, tmp_path, "--exporter", "console")  # to stdout, by default
    lines = {}
    for line in run.stdout.splitlines():
        if m := CONSOLE_LINE.match(line):
            goid = int(m[1])
            assert goid not in lines, f"goroutine {goid} printed twice"
            lines[goid] = m
    assert lines[manifest["main_goid"]][3] == "runtime.main"
    assert lines[manifest["main_goid"]][2] is None  # the root
    for g in manifest["goroutines"]:
        m = lines[g["goid"]]
        assert (int(m[2]), m[3]) == (g["parent"], g["func"])
        assert m[4].endswith("tree/main.go") and int(m[5]) == site_line("tree", g["site"])
        assert m[6] == ("process_exited" if g["func"] == "main.stuck" else "exited")
    # Each span's events follow its line, indented: a leaf's include its wait on the channel.
    leaf = next(g["goid"] for g in manifest["goroutines"] if g["func"] == "main.leaf")
    block = run.stdout.split(lines[leaf][0] + "\n", 1)[1].split("\ngoroutine ", 1)[0]
    assert "  waiting (chan receive)" in block and block.rstrip().endswith("exited")


@pytest.mark.parametrize("base_endpoint", [False, True], ids=["traces-endpoint-only", "over-the-base-endpoint"])
def test_standard_otlp_variables_reach_the_receiver(programs, receiver, tmp_path, base_endpoint):
    receiver.clear()
    env = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{receiver.port}/tenant-a/v1/traces",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=acme,authorization=Bearer%20t0k3n",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=ci,team=goroutines",
    }
    if base_endpoint:  # the signal-specific variable wins over the base one (nothing listens there)
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
    marker, env = run_marker(env)
    run, manifest = _run_tree(programs, tmp_path, "--metrics-interval", "0", env=env)
    want = {g["goid"] for g in manifest["goroutines"]} | {manifest["main_goid"]}
    spans = by_goid(of_run(receiver.wait_for(lambda got: want <= {s.attributes["go.goroutine.id"] for s in of_run(got, marker)}), marker))
    assert want <= set(spans), run.stderr
    assert "nothing dropped" in run.stderr
    requests = [(path, headers) for path, headers, runs in receiver.trace_requests if marker in runs]
    assert requests
    for path, headers in requests:
        assert path == "/tenant-a/v1/traces"
        assert headers["x-tenant"] == "acme" and headers["authorization"] == "Bearer t0k3n"
    for span in spans.values():
        assert span.resource["deployment.environment.name"] == "ci" and span.resource["team"] == "goroutines"
        assert span.resource["service.name"] == programs["tree"].name  # still the default
    _assert_tree(manifest, spans)


def test_default_spawner_threshold(programs, tmp_path):
    """A creator that has created more than 16 goroutines (the default --spawner-children), or is
    older than 1 s (--spawner-age), is a spawner: the ticker's dispatcher starts a tick every 10 ms,
    so its first 16 ticks join its trace as its children, and every later one starts a trace of its
    own, linked to the dispatcher's span."""
    out, manifest_path = tmp_path / "spans.jsonl", tmp_path / "ticker.json"
    run = run_agent(["run", "-q", "--exporter", "file", "--output", str(out), "--",
                     str(programs["ticker"]), str(manifest_path), "600ms"])
    assert run.returncode == 0, run.stderr
    spans = by_goid(spans_from_otlp_json(out))
    made = {g["goid"] for g in json.loads(manifest_path.read_text())["goroutines"] if g["func"] == "main.tick"}
    dispatcher = next(s for s in spans.values() if s.name == "main.dispatcher")
    ticks = sorted((s for s in spans.values() if s.name == "main.tick"), key=lambda s: s.start_ns)
    assert {s.attributes["go.goroutine.id"] for s in ticks} == made
    young = [t for t in ticks if t.start_ns - dispatcher.start_ns <= 1_000_000_000]
    assert len(young) > 17, "the dispatcher was over 1 s old before its 17th tick: cannot judge the child count"
    for n, tick in enumerate(ticks, 1):
        joins = n <= 16 and tick.start_ns - dispatcher.start_ns <= 1_000_000_000
        if joins:
            assert (tick.trace_id, tick.parent_span_id) == (dispatcher.trace_id, dispatcher.span_id), n
            assert "go.goroutine.trace_reason" not in tick.attributes
        else:
            assert tick.parent_span_id == "" and tick.trace_id != dispatcher.trace_id, n
            assert tick.attributes["go.goroutine.trace_reason"] == "spawner", n
            assert tick.links[0][:2] == (dispatcher.trace_id, dispatcher.span_id)
    assert sum(t.trace_id == dispatcher.trace_id for t in ticks) == 16
