"""Who woke whom: real probes on a program whose goroutines are woken by known wakers (tests/programs/wakes
records them: a channel send, an unlock, a close, a timer, a network read, a two-hop chain), on the oldest
and newest Go of the matrix, with and without symbols. Each wake event names the waker the program
recorded, and the woken goroutine's span links to the waker's span."""

from __future__ import annotations

import json
import sys

import pytest

from helpers import ROOT, build_program, by_goid, run_agent, spans_from_otlp_json

sys.path.insert(0, str(ROOT / "scripts"))
import go_toolchains  # noqa: E402

pytestmark = pytest.mark.ebpf

OLDEST, NEWEST = min(go_toolchains.RELEASES, key=lambda v: tuple(map(int, v.split(".")))), \
    max(go_toolchains.RELEASES, key=lambda v: tuple(map(int, v.split("."))))
CELLS = [(go, stripped) for go in (OLDEST, NEWEST) for stripped in (False, True)]


def _wake_after(span, waits_on: list[str]) -> dict:
    """The attributes of the event that ended the goroutine's last wait of one of these reasons."""
    events = span.events
    last = max(i for i, (name, _, a) in enumerate(events) if name == "waiting" and a.get("go.goroutine.wait_reason") in waits_on)
    name, _, attrs = events[last + 1]
    assert name == "runnable" and attrs["go.goroutine.state.previous"] == "waiting", events[last:last + 2]
    return attrs


@pytest.mark.parametrize("go,stripped", CELLS, ids=[f"go{go}-{'stripped' if s else 'symbols'}" for go, s in CELLS])
def test_each_wake_names_its_waker(go, stripped, tmp_path):
    binary = build_program("wakes", go=str(go_toolchains.toolchain(go)), flags=("-ldflags=-s -w",) if stripped else ())
    manifest_path, spans_path = tmp_path / "manifest.json", tmp_path / "spans.jsonl"
    run = run_agent(["run", "--exporter", "file", "--output", str(spans_path), "--quiet", "--",
                     str(binary), str(manifest_path)])
    assert run.returncode == 0, run.stderr
    wakes = json.loads(manifest_path.read_text())["wakes"]
    assert {w["scenario"] for w in wakes} == {"channel", "mutex", "close", "timer", "network", "chain"}
    spans = by_goid(spans_from_otlp_json(spans_path))
    for wake in wakes:
        woken = spans[wake["woken"]]
        attrs = _wake_after(woken, wake["waits_on"])
        if wake["waker"]:
            waker = spans[wake["waker"]]
            assert (attrs["go.goroutine.waker.kind"], attrs["go.goroutine.waker.id"]) == ("goroutine", wake["waker"]), wake
            assert (waker.trace_id, waker.span_id, {"go.goroutine.link": "waker"}) in woken.links, wake
        else:
            assert attrs["go.goroutine.waker.kind"] == "runtime" and "go.goroutine.waker.id" not in attrs, wake
            assert attrs.get("go.goroutine.waker.cause") == wake["cause"], wake


def test_no_wakers_option_names_none(tmp_path):
    binary = build_program("wakes", go=str(go_toolchains.toolchain(NEWEST)))
    spans_path = tmp_path / "spans.jsonl"
    run = run_agent(["run", "--exporter", "file", "--output", str(spans_path), "--quiet", "--no-wakers", "--",
                     str(binary), str(tmp_path / "manifest.json")])
    assert run.returncode == 0, run.stderr
    spans = spans_from_otlp_json(spans_path)
    assert sum(name == "runnable" for s in spans for name, _, _ in s.events) > 10  # the wakes are there, unnamed
    assert not any("go.goroutine.waker.kind" in attrs for s in spans for _, _, attrs in s.events)
    assert not any(link[2].get("go.goroutine.link") == "waker" for s in spans for link in s.links)
