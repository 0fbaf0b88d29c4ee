"""Goroutine spans inside the application's own traces.

tests/programs/appservice, a net/http service instrumented with the OpenTelemetry Go SDK, is built
with the SDK's newest release and an older one whose structs differ (v1.19.0, by Go 1.23, whose pprof
labels are a map), with DWARF and stripped. It exports its own spans over OTLP/HTTP to the same
collector (rotel) as the agent. Requests carry a traceparent chosen by the test; their handlers start
goroutines (under the server span, under a nested span, under spans of those goroutines, with pprof
labels); the service writes down which span each goroutine's span must have as parent.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import AGENT, ROOT, SDK_NEWEST, Span, build_appservice, build_program, group_spans, run_agent

sys.path.insert(0, str(ROOT / "scripts"))
import go_toolchains  # noqa: E402

pytestmark = pytest.mark.ebpf

SDK_OLDER = "v1.19.0"
# variant -> (SDK release, Go minor version, go build flags, how the agent traces it)
VARIANTS = {
    "newest": (SDK_NEWEST, None, (), "run"),
    "newest-stripped": (SDK_NEWEST, None, ("-ldflags=-s -w",), "run"),
    "older-go1.23": (SDK_OLDER, "1.23", (), "run"),
    "older-go1.23-stripped-attached": (SDK_OLDER, "1.23", ("-ldflags=-s -w",), "attach"),
}
SAMPLED_REQUESTS, UNSAMPLED_REQUESTS = 6, 2


def _traceparent(trace_id: str, sampled: bool) -> str:
    return f"00-{trace_id}-{random.getrandbits(64):016x}-{'01' if sampled else '00'}"


@dataclass
class Traced:
    variant: str
    binary: Path
    manifest: dict
    sent: dict[str, tuple[str, bool]]   # request id -> (trace id, sampled)
    spans: list[Span]                   # everything the collector got from this run
    pid: int
    agent_stderr: str

    def goroutine_spans(self) -> dict[int, Span]:
        """The agent's final goroutine spans of this run, by goroutine id."""
        return {s.attributes["go.goroutine.id"]: s for s in self.spans
                if s.resource.get("process.pid") == self.pid and "go.goroutine.id" in s.attributes
                and "go.goroutine.partial" not in s.attributes}

    def app_spans(self) -> dict[str, Span]:
        """The service's own spans, by span id."""
        return {s.span_id: s for s in self.spans if s.resource.get("telemetry.sdk.language") == "go"}


def _wait_for_file(path: Path, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.05)
    return path.read_text()


def _trace(variant: str, rotel, receiver, tmp: Path, extra: tuple[str, ...] = ()) -> Traced:
    sdk, go_minor, flags, how = VARIANTS[variant]
    binary = build_appservice(sdk, str(go_toolchains.toolchain(go_minor)) if go_minor else None, flags)
    ready, manifest_path = tmp / "port", tmp / "manifest.json"
    env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=rotel.endpoint("http/protobuf"), OTEL_SERVICE_NAME=f"appservice-{variant}",
               OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf")
    agent_args = ["--endpoint", rotel.endpoint("http/protobuf"), "--protocol", "http/protobuf", "-q", "--metrics-interval", "0", *extra]
    receiver.clear()
    service = None
    if how == "run":
        agent = subprocess.Popen(AGENT + ["run", *agent_args, "--", str(binary), str(ready), str(manifest_path)],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        port = int(_wait_for_file(ready))  # the program runs only once the probes are in place
        pid = int(subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()[0])
    else:
        service = subprocess.Popen([str(binary), str(ready), str(manifest_path)], env=env)
        port, pid = int(_wait_for_file(ready)), service.pid
        agent = subprocess.Popen(AGENT + ["attach", *agent_args, str(pid)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # The janitor starts a main.tick every 20 ms: its spans say the probes are in place.
        got = receiver.wait_for(lambda spans: any(s.name == "main.tick" and s.resource.get("process.pid") == pid for s in spans), 30)
        assert any(s.name == "main.tick" for s in got), agent.stderr.read() if agent.poll() is not None else "no tick span"
    sent = {}
    try:
        for i in range(SAMPLED_REQUESTS + UNSAMPLED_REQUESTS):
            rid, sampled = f"r{i}", i < SAMPLED_REQUESTS
            trace_id = f"{random.getrandbits(128):032x}"
            sent[rid] = (trace_id, sampled)
            req = urllib.request.Request(f"http://127.0.0.1:{port}/work?id={rid}",
                                         headers={"traceparent": _traceparent(trace_id, sampled), "Connection": "close"})
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert resp.read() == b"ok\n"
        time.sleep(0.3)
    finally:
        os.kill(pid, signal.SIGTERM)  # the service flushes its spans and writes its manifest
        if service is not None:
            service.wait(15)
        _, err = agent.communicate(timeout=60)
    assert agent.returncode == 0, err
    manifest = json.loads(manifest_path.read_text())
    # --app-traces off, --app-unsampled ignore: every request's goroutines are exported, sampled or not
    follows_app = "--app-traces" not in extra and "--app-unsampled" not in extra
    expected = {g["goid"] for rid, r in manifest["requests"].items() if sent[rid][1] or not follows_app for g in r["goroutines"]}
    server_spans = {r["server_span"] for rid, r in manifest["requests"].items() if sent[rid][1]}
    spans = receiver.wait_for(lambda got: expected <= {s.attributes.get("go.goroutine.id") for s in got
                                                        if s.resource.get("process.pid") == pid}
                              and server_spans <= {s.span_id for s in got}, 20)
    return Traced(variant, binary, manifest, sent, spans, pid, err)


@pytest.fixture(scope="module", params=list(VARIANTS))
def traced(request, rotel, receiver, tmp_path_factory):
    return _trace(request.param, rotel, receiver, tmp_path_factory.mktemp(request.param))


def _expected_parent(traced: Traced, goroutine: dict) -> str:
    kind, value = goroutine["parent"].split(":")
    return value if kind == "span" else traced.goroutine_spans()[int(value)].span_id


def test_handler_goroutines_are_children_of_the_request_span(traced):
    spans, app = traced.goroutine_spans(), traced.app_spans()
    sampled = {rid: r for rid, r in traced.manifest["requests"].items() if traced.sent[rid][1]}
    assert len(sampled) == SAMPLED_REQUESTS
    for rid, request in sampled.items():
        trace_id = traced.sent[rid][0]
        assert request["trace_id"] == trace_id and request["sampled"]
        server = app[request["server_span"]]  # the service exported its own span to the same collector
        assert server.trace_id == trace_id and server.name == "GET /work"
        assert len(request["goroutines"]) == 10  # 3 fetch, 3 parse, query, audit, sub, labelled
        for g in request["goroutines"]:
            span = spans[g["goid"]]
            assert span.name == g["func"], g
            assert span.trace_id == trace_id, (rid, g)
            assert span.parent_span_id == _expected_parent(traced, g), (rid, g)
        direct = [g for g in request["goroutines"] if g["parent"] == f"span:{request['server_span']}"]
        assert sorted(g["func"] for g in direct) == ["main.audit", "main.fetch", "main.fetch", "main.fetch", "main.labelled"]
        for g in direct:
            assert spans[g["goid"]].attributes["go.goroutine.trace_reason"] == "application_span"
        # Under the handler's nested span, and under spans that goroutines of the request started.
        query = next(g for g in request["goroutines"] if g["func"] == "main.query")
        assert app[_expected_parent(traced, query)].name == "db.query"
        for parse in (g for g in request["goroutines"] if g["func"] == "main.parse"):
            assert app[_expected_parent(traced, parse)].name == "fetch"
        # A goroutine started with no span active follows its creator into the trace, as its child.
        sub = next(g for g in request["goroutines"] if g["func"] == "main.sub")
        assert spans[sub["goid"]].parent_span_id == spans[int(sub["parent"].split(":")[1])].span_id
        assert "go.goroutine.trace_reason" not in spans[sub["goid"]].attributes
        # The connection's goroutine, where the handler ran, is not in the request's trace.
        assert spans[request["handler_goid"]].trace_id != trace_id


def test_unsampled_requests_follow_the_applications_decision(traced):
    spans = traced.goroutine_spans()
    unsampled = {rid: r for rid, r in traced.manifest["requests"].items() if not traced.sent[rid][1]}
    assert len(unsampled) == UNSAMPLED_REQUESTS
    for rid, request in unsampled.items():
        assert not request["sampled"]
        assert not {g["goid"] for g in request["goroutines"]} & set(spans)
        assert not [s for s in traced.spans if s.trace_id == traced.sent[rid][0]]
    assert f"({10 * UNSAMPLED_REQUESTS} goroutine spans not exported: their application trace was not sampled)" in traced.agent_stderr


def test_goroutines_outside_requests_keep_their_own_traces(traced):
    spans, app = traced.goroutine_spans(), traced.app_spans()
    app_traces = {s.trace_id for s in app.values()}
    ticks = [spans[goid] for goid in traced.manifest["ticks"] if goid in spans]
    assert len(ticks) >= 5
    # The janitor predates an attach: stripped, it has no span (no symbol table to list it).
    janitor = [s for s in spans.values() if s.name == "main.janitor"]
    assert janitor or traced.variant.endswith("stripped-attached")
    for span in [*ticks, *janitor]:
        assert span.trace_id not in app_traces
        assert span.attributes.get("go.goroutine.trace_reason") != "application_span"
    groups = group_spans([s for s in traced.spans if s.resource.get("process.pid") == traced.pid])
    for tick in ticks:
        if tick.attributes.get("go.goroutine.trace_reason") == "grouped":  # short, childless, its spawner's: grouped
            group = groups[(tick.trace_id, tick.parent_span_id)]
            assert group.trace_id not in app_traces
            assert group.attributes["go.goroutine.group.spawner_id"] == tick.attributes["go.goroutine.parent_id"]
        else:
            assert tick.parent_span_id in ("", *(j.span_id for j in janitor))
    # In main: warmup started under the "startup" span; the janitor, after that span ended, is not in it.
    if traced.variant.endswith("attached"):
        return  # both predate the attach
    warmup = traced.manifest["startup"][0]
    startup = app[warmup["parent"].split(":")[1]]
    assert startup.name == "startup"
    assert spans[warmup["goid"]].trace_id == startup.trace_id
    assert spans[warmup["goid"]].parent_span_id == startup.span_id
    assert janitor[0].trace_id != startup.trace_id


def test_pprof_labels_become_span_attributes(traced):
    spans = traced.goroutine_spans()
    for rid, request in traced.manifest["requests"].items():
        if not traced.sent[rid][1]:
            continue
        by_func = {g["func"]: spans[g["goid"]].attributes for g in request["goroutines"]}
        # Inherited from the handler's pprof.Do, by a goroutine and by the one it started.
        assert by_func["main.audit"]["go.goroutine.label.request.id"] == rid
        assert by_func["main.sub"]["go.goroutine.label.request.id"] == rid
        # Set by the goroutine itself, on top of the inherited one.
        assert by_func["main.labelled"]["go.goroutine.label.request.id"] == rid
        assert by_func["main.labelled"]["go.goroutine.label.stage"] == "labelled"
        assert not any(k.startswith("go.goroutine.label.") for k in by_func["main.query"])


@pytest.fixture(scope="module")
def traced_ignoring_sampling(rotel, receiver, tmp_path_factory):
    """The newest SDK's service traced with --app-unsampled ignore."""
    return _trace("newest", rotel, receiver, tmp_path_factory.mktemp("ignoring"), ("--app-unsampled", "ignore"))


def test_app_unsampled_ignore_exports_unsampled_requests_in_their_trace(traced_ignoring_sampling):
    """The application did not sample these requests (its own spans are not exported): their goroutine
    spans are exported anyway, in the request's trace, under the spans the application would have had."""
    traced = traced_ignoring_sampling
    spans, app = traced.goroutine_spans(), traced.app_spans()
    unsampled = {rid: r for rid, r in traced.manifest["requests"].items() if not traced.sent[rid][1]}
    assert len(unsampled) == UNSAMPLED_REQUESTS
    for rid, request in unsampled.items():
        trace_id = traced.sent[rid][0]
        assert request["trace_id"] == trace_id and not request["sampled"]
        assert request["server_span"] not in app  # the application exported nothing of it
        assert len(request["goroutines"]) == 10
        for g in request["goroutines"]:
            span = spans[g["goid"]]
            assert span.name == g["func"] and span.trace_id == trace_id, (rid, g)
            assert span.parent_span_id == _expected_parent(traced, g), (rid, g)
    assert "goroutine spans not exported" not in traced.agent_stderr


@pytest.fixture(scope="module")
def traced_without(rotel, receiver, tmp_path_factory):
    """The newest SDK's service traced with both features off."""
    return _trace("newest", rotel, receiver, tmp_path_factory.mktemp("without"), ("--app-traces", "off", "--no-pprof-labels"))


def test_app_traces_off_keeps_goroutines_in_their_own_traces(traced_without):
    spans, app = traced_without.goroutine_spans(), traced_without.app_spans()
    app_traces = {s.trace_id for s in app.values()}
    assert {rid for rid, (_, sampled) in traced_without.sent.items() if sampled} == \
        {rid for rid, r in traced_without.manifest["requests"].items() if r["sampled"]}  # the service sampled as told
    for rid, request in traced_without.manifest["requests"].items():
        assert len(request["goroutines"]) == 10
        for g in request["goroutines"]:
            span = spans[g["goid"]]  # exported, whatever the application sampled
            assert span.name == g["func"]
            assert span.trace_id not in app_traces and span.trace_id != traced_without.sent[rid][0], (rid, g)
            assert span.attributes.get("go.goroutine.trace_reason") != "application_span"
            # Its parent is its creator's span, as without the SDK.
            creator = spans.get(span.attributes["go.goroutine.parent_id"])
            assert span.parent_span_id in ("", creator.span_id if creator else "")
    assert "goroutine spans not exported" not in traced_without.agent_stderr
    assert "application spans (" not in traced_without.agent_stderr


def test_no_pprof_labels_gives_no_label_attributes(traced_without):
    spans = traced_without.goroutine_spans()
    assert len(spans) > 10 * len(traced_without.manifest["requests"])
    labelled = [s for s in spans.values() if any(k.startswith("go.goroutine.label.") for k in s.attributes)]
    assert labelled == []
    # The goroutines that carry labels by default (test_pprof_labels_become_span_attributes) are there.
    funcs = {s.name for s in spans.values()}
    assert {"main.audit", "main.sub", "main.labelled"} <= funcs


def test_inspect_reports_the_sdk_and_correlation(traced):
    sdk, _, flags, _ = VARIANTS[traced.variant]
    run = run_agent(["inspect", str(traced.binary)])
    assert run.returncode == 0, run.stderr
    assert f"OpenTelemetry:   go.opentelemetry.io/otel/sdk {sdk}" in run.stdout
    assert "correlation:   possible" in run.stdout
    assert ("generated table for " + sdk if flags else "offsets from DWARF") in run.stdout
    assert "on_app_span_start      go.opentelemetry.io/otel/sdk/trace.(*tracer).Start+" in run.stdout


def test_inspect_without_the_sdk():
    run = run_agent(["inspect", str(build_program("tree"))])
    assert run.returncode == 0, run.stderr
    assert "OpenTelemetry:   no Go SDK linked in" in run.stdout
    assert "correlation:   not possible" in run.stdout
    assert "on_app_span" not in run.stdout


def _duration(ns: int) -> str:
    return f"{ns / 1e6:.2f} ms" if ns >= 1e6 else f"{ns / 1e3:.0f} us"


def render_tree(spans: list[Span], trace_id: str) -> str:
    """One trace as a text tree, children by start time: the application's spans, and goroutine spans
    with their lifetime, time in each state, what they waited on, their pprof labels."""
    in_trace = [s for s in spans if s.trace_id == trace_id and "go.goroutine.partial" not in s.attributes]
    ids = {s.span_id for s in in_trace}
    children: dict[str, list[Span]] = {}
    for s in in_trace:
        children.setdefault(s.parent_span_id if s.parent_span_id in ids else "", []).append(s)
    rows = []

    def walk(span: Span, prefix: str, last: bool, top: bool) -> None:
        a = span.attributes
        if "go.goroutine.id" in a:
            waits = sorted({e[2]["go.goroutine.wait_reason"] for e in span.events if "go.goroutine.wait_reason" in e[2]})
            states = ", ".join(f"{k[len('go.goroutine.'):-3]} {_duration(v)}" + (f" ({', '.join(waits)})" if k.endswith("waiting_ns") and waits else "")
                               for k, v in a.items() if k.startswith("go.goroutine.") and k.endswith("_ns") and v >= 1000)
            labels = " ".join(f"{k[len('go.goroutine.label.'):]}={v}" for k, v in a.items() if k.startswith("go.goroutine.label."))
            what = f"goroutine {a['go.goroutine.id']}"
            detail = states + (f"; labels {labels}" if labels else "")
        else:
            what, detail = "application span", ""
        rows.append((("" if top else prefix + ("└─ " if last else "├─ ")) + span.name, what, _duration(span.end_ns - span.start_ns), detail))
        kids = sorted(children.get(span.span_id, []), key=lambda s: s.start_ns)
        for i, kid in enumerate(kids):
            walk(kid, "" if top else prefix + ("   " if last else "│  "), i == len(kids) - 1, False)

    for root in sorted(children.get("", []), key=lambda s: s.start_ns):
        walk(root, "", True, True)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip() for r in rows]
    return f"trace {trace_id}\n" + "\n".join(lines)


def test_render_one_trace(traced):
    """The rendered tree of one request (shown with pytest -s; the README shows one)."""
    rid = "r0"
    tree = render_tree(traced.spans, traced.sent[rid][0])
    print(f"\n[{traced.variant}]\n{tree}")
    assert tree.count("  goroutine ") == 10 and tree.splitlines()[1].startswith("GET /work")
