"""`otel-goroutines attach` to a Go program that has been running for a while."""

import json
import signal
import subprocess
import time

import pytest

from helpers import AGENT, attach_to_ticker, by_goid, creator_links, goroutine_spans, group_spans, site_line, ticks_untraced_after_attach

pytestmark = pytest.mark.ebpf


def _start_ticker(programs, tmp_path, duration="30s"):
    manifest = tmp_path / "ticker.json"
    proc = subprocess.Popen([str(programs["ticker"]), str(manifest), duration])
    time.sleep(0.5)  # running for a while before the agent comes
    return proc, manifest


def _attach(pid, rotel, *extra):
    return subprocess.Popen(AGENT + ["attach", "--endpoint", rotel.endpoint("grpc"), "--protocol", "grpc", "-q", *extra, str(pid)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_attached(agent, receiver, timeout=15.0):
    # Attached once the first tick goroutine's span has gone through the collector.
    spans = receiver.wait_for(lambda got: any(s.name == "main.tick" for s in got), timeout)
    assert any(s.name == "main.tick" for s in spans), agent.stderr.read() if agent.poll() is not None else "no spans"


def test_attach_until_sigint(programs, rotel, receiver, tmp_path):
    receiver.clear()
    ticker, manifest_path = _start_ticker(programs, tmp_path)
    try:
        agent = _attach(ticker.pid, rotel)
        _wait_attached(agent, receiver)
        # Traced for a while: 30 ticks through the collector, however slow the machine.
        count = lambda got: sum(s.name == "main.tick" and s.resource["process.pid"] == ticker.pid for s in got)
        assert count(receiver.wait_for(lambda got: count(got) >= 30, 60)) >= 30
        agent.send_signal(signal.SIGINT)
        out, err = agent.communicate(timeout=30)
        assert agent.returncode == 0, err
        assert "Traceback" not in err
        assert ticker.poll() is None  # the target is left running
    finally:
        ticker.send_signal(signal.SIGTERM)
        ticker.wait(10)
    received = [s for s in receiver.wait_for(lambda got: False, timeout=1.0) if s.resource["process.pid"] == ticker.pid]
    spans, groups = goroutine_spans(received), group_spans(received)
    spans_by_goid = by_goid(spans)
    ticks = [s for s in spans if s.name == "main.tick"]
    tocks = [s for s in spans if s.name == "main.tock"]
    assert len(ticks) >= 30
    # The dispatcher existed before the attach: its span starts at the attach and says so.
    dispatcher = next(s for s in spans if s.name == "main.dispatcher")
    assert dispatcher.attributes["go.goroutine.existed_at_attach"] is True
    assert dispatcher.attributes["code.line.number"] == site_line("ticker", "dispatcher")
    assert dispatcher.attributes["go.goroutine.end_reason"] == "agent_stopped"
    # It is a spawner: each tick starts a trace of its own, linked to the dispatcher's span
    # (ticks created while the goroutine list was being read, a few ms, may lack the link).
    assert {s.attributes["go.goroutine.parent_id"] for s in ticks} == {dispatcher.attributes["go.goroutine.id"]}
    linked = [t for t in ticks if creator_links(t)]
    assert len(linked) >= len(ticks) - 1
    for tick in linked:
        assert tick.parent_span_id == "" and tick.attributes["go.goroutine.trace_reason"] == "spawner"
        assert tick.links[0][:2] == (dispatcher.trace_id, dispatcher.span_id)
    assert len({t.trace_id for t in ticks}) == len(ticks)
    # A tock joins its tick's trace, as the child of the tick's span; one started by a tick that
    # existed at attach (a spawner by rule) is short and starts none: it is in the group of that
    # tick's short goroutines (--group-window), whose span links to the tick.
    by_span = {(s.trace_id, s.span_id): s for s in spans}
    traced_parent_tocks = [t for t in tocks if t.attributes["go.goroutine.parent_id"] in spans_by_goid]
    assert len(traced_parent_tocks) >= len(ticks) - 2
    for tock in traced_parent_tocks:
        parent = spans_by_goid[tock.attributes["go.goroutine.parent_id"]]
        assert parent.name == "main.tick"
        if (tock.trace_id, tock.parent_span_id) in groups:
            assert parent.attributes.get("go.goroutine.existed_at_attach") and tock.attributes["go.goroutine.trace_reason"] == "grouped"
            assert groups[(tock.trace_id, tock.parent_span_id)].links[0][:2] == (parent.trace_id, parent.span_id)
        else:
            assert by_span[(tock.trace_id, tock.parent_span_id)] is parent
    # Goroutines alive when the agent stopped are ended then, and marked.
    stopped = [s for s in spans if s.attributes["go.goroutine.end_reason"] == "agent_stopped"]
    assert all(s.attributes["go.goroutine.alive_at_end"] for s in stopped)
    assert {s.attributes["go.goroutine.end_reason"] for s in ticks} <= {"exited", "agent_stopped"}
    assert "goroutines seen" in err


def test_attach_until_the_target_exits(programs, rotel, receiver, tmp_path):
    receiver.clear()
    ticker, manifest_path = _start_ticker(programs, tmp_path, duration="120s")
    try:
        agent = _attach(ticker.pid, rotel)
        # The target ends itself (SIGTERM: it writes its manifest and exits) once 50 ticks are through.
        count = lambda got: sum(s.name == "main.tick" and s.resource["process.pid"] == ticker.pid for s in got)
        assert count(receiver.wait_for(lambda got: count(got) >= 50, 60)) >= 50, agent.stderr.read() if agent.poll() is not None else ""
    finally:
        ticker.send_signal(signal.SIGTERM)
        ticker.wait(10)
    out, err = agent.communicate(timeout=30)
    assert agent.returncode == 0, err
    manifest = json.loads(manifest_path.read_text())
    spans = [s for s in receiver.wait_for(lambda got: False, timeout=1.0) if s.resource["process.pid"] == ticker.pid]
    # Every tick the program spawned after the attach has its span (the program's own list).
    missed, spawned = ticks_untraced_after_attach(manifest, spans)
    assert spawned >= 49 and not missed, (missed, err)
    assert {s.attributes["go.goroutine.end_reason"] for s in goroutine_spans(spans)} <= {"exited", "process_exited"}


def test_attach_takes_the_service_from_the_target(programs, rotel, receiver, tmp_path):
    """The target's own OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES name the goroutine spans'
    resource; the agent's own OTEL_RESOURCE_ATTRIBUTES override them."""
    receiver.clear()
    app_env = {"OTEL_SERVICE_NAME": "ticker-svc", "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test,team=app%20team"}
    ticks = lambda: any(s.name == "main.tick" for s in list(receiver.spans))
    pid, err = attach_to_ticker(programs["ticker"], tmp_path, ["--endpoint", rotel.endpoint("grpc"), "--protocol", "grpc"],
                                app_env, ticks, agent_env={"OTEL_RESOURCE_ATTRIBUTES": "team=agent"})
    spans = [s for s in receiver.wait_for(lambda got: False, timeout=1.0) if s.resource["process.pid"] == pid]
    assert spans, err
    for span in spans:
        assert span.resource["service.name"] == "ticker-svc"
        assert span.resource["deployment.environment"] == "test"
        assert span.resource["team"] == "agent"


def test_probe_groups_detach_and_attach_again_on_one_process(programs, tmp_path):
    """Two processes on one BPF program; one process's probe groups are detached at run time (what
    an overhead budget does) and attached again: its goroutines stop being seen, then are seen
    again, while the other process is traced throughout (its probes are its own)."""
    from helpers import poll, tickers_on_one_program
    from otel_goroutines.probes import ProbeSettings
    with tickers_on_one_program(programs["ticker"], tmp_path, ProbeSettings()) as probes:
        created = lambda p: p.counters()["goroutines_created"]
        for p in probes:
            p.attach()
        assert poll(lambda: all(created(p) >= 10 for p in probes), 20)
        for group in list(probes[0].attached_groups):
            probes[0].detach_group(group)
        time.sleep(0.1)  # a creation already inside a handler may still count
        stopped, other = created(probes[0]), created(probes[1])
        assert poll(lambda: created(probes[1]) >= other + 20, 20)
        assert created(probes[0]) == stopped  # 20 ticks of the other later: none of this one's seen
        for group in probes[0].groups:
            probes[0].attach_group(group)
        assert poll(lambda: created(probes[0]) >= stopped + 10, 20)
        for p in probes:  # each process's records came to it alone
            batch = p.drain()
            assert set(batch.ends["tgid"].tolist()) <= {p.pid}
