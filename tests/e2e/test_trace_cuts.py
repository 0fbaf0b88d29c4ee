"""How traces are cut, on the two long-lived spawners of a service-like program (tests/programs/spawners:
a 20 ms ticker of short main.beat goroutines, a dispatcher of short main.work goroutines and of
main.fanout goroutines that start two main.part each), traced past several checkpoints:
- whole lives: every goroutine span covers what the goroutine recorded of its life, the spawners'
  final spans from their creation although checkpoints went out meanwhile; no span starts before
  its parent;
- the spawners' short childless goroutines share one trace per spawner per window (--group-window),
  under a span of the group that covers them; goroutines that start goroutines keep traces of their
  own. The number of traces is bounded by the run's length, as the program measured it."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from helpers import build_program, by_goid, run_agent, spans_from_otlp_json

pytestmark = pytest.mark.ebpf

WINDOW_S = 1.0
RUN = "4s"


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spawners")
    out, manifest_path = tmp / "spans.jsonl", tmp / "manifest.json"
    run = run_agent(["run", "-q", "--exporter", "file", "--output", str(out), "--checkpoint-after", "0.5",
                     "--group-window", str(WINDOW_S), "--", str(build_program("spawners")), str(manifest_path), RUN])
    assert run.returncode == 0, run.stderr
    spans = spans_from_otlp_json(out)
    final = [s for s in spans if "go.goroutine.partial" not in s.attributes]
    return dict(manifest=json.loads(manifest_path.read_text()), spans=spans, err=run.stderr,
                goroutines=by_goid([s for s in final if "go.goroutine.id" in s.attributes]),
                groups=[s for s in final if "go.goroutine.group.goroutines" in s.attributes], final=final)


def _spawner(traced, name):
    (span,) = [s for s in traced["goroutines"].values() if s.name == name]
    return span


def test_every_goroutine_span_covers_its_whole_life(traced):
    recorded = {g["goid"]: g for g in traced["manifest"]["goroutines"]}
    goroutines = traced["goroutines"]
    assert recorded.keys() <= goroutines.keys()
    for goid, g in recorded.items():
        span = goroutines[goid]
        assert span.start_ns <= g["started"] and g["ended"] <= span.end_ns, g
    for name in ("main.ticker", "main.dispatcher"):  # ran past several checkpoints...
        final = _spawner(traced, name)
        checkpoints = [s for s in traced["spans"] if s.name == name and "go.goroutine.partial" in s.attributes]
        assert final.attributes["go.goroutine.checkpoints"] == len(checkpoints) >= 3
        assert final.start_ns == min(c.start_ns for c in checkpoints)  # ...and its final span starts at its creation
    for span in goroutines.values():  # to the end, or to the process's exit, marked
        if span.attributes["go.goroutine.end_reason"] != "exited":
            assert span.attributes["go.goroutine.end_reason"] == "process_exited"
            assert span.attributes["go.goroutine.alive_at_end"] is True


def test_no_span_starts_before_its_parent_and_groups_cover_their_members(traced):
    final = traced["final"]
    by_id = {(s.trace_id, s.span_id): s for s in final}
    groups = {(g.trace_id, g.span_id) for g in traced["groups"]}
    for span in final:
        if not span.parent_span_id:
            continue
        parent = by_id[(span.trace_id, span.parent_span_id)]  # no orphan: every parent is in its trace
        assert parent.start_ns <= span.start_ns, (span.name, parent.name)
        if (parent.trace_id, parent.span_id) in groups:
            assert span.end_ns <= parent.end_ns


@pytest.mark.parametrize("spawner, short", [("main.ticker", "main.beat"), ("main.dispatcher", "main.work")])
def test_short_goroutines_of_a_spawner_share_one_trace_per_window(traced, spawner, short):
    manifest, goroutines = traced["manifest"], traced["goroutines"]
    owner = _spawner(traced, spawner)
    made = [goroutines[g["goid"]] for g in manifest["goroutines"] if g["func"] == short]
    assert len(made) >= 100
    joined = [s for s in made if s.trace_id == owner.trace_id]  # its first children, while it was young
    grouped = [s for s in made if s.attributes.get("go.goroutine.trace_reason") == "grouped"]
    assert len(joined) <= 16 and len(joined) + len(grouped) == len(made)
    assert all("go.goroutine.trace_reason" not in s.attributes for s in joined)
    windows = {s.start_ns // int(WINDOW_S * 1e9) for s in grouped}  # creation, on the wall clock
    traces = {s.trace_id for s in grouped}
    # One trace per window the program created them in; the run, as the program timed it, bounds that.
    assert len(traces) == len(windows) <= math.ceil((manifest["stopped"] - manifest["started"]) / 1e9 / WINDOW_S) + 1
    groups = {g.trace_id: g for g in traced["groups"] if g.trace_id in traces}
    assert groups.keys() == traces
    for trace_id, group in groups.items():
        members = [s for s in grouped if s.trace_id == trace_id]
        assert len({s.start_ns // int(WINDOW_S * 1e9) for s in members}) == 1
        assert group.name == f"short goroutines of {spawner}" and group.parent_span_id == ""
        assert group.attributes["go.goroutine.group.goroutines"] == len(members)
        assert group.attributes["go.goroutine.group.spawner_id"] == owner.attributes["go.goroutine.id"]
        assert [link[:2] for link in group.links] == [(owner.trace_id, owner.span_id)]
        assert {s.parent_span_id for s in members} == {group.span_id}


def test_goroutines_that_start_goroutines_keep_their_own_traces(traced):
    manifest, goroutines = traced["manifest"], traced["goroutines"]
    dispatcher = _spawner(traced, "main.dispatcher")
    fanouts = [goroutines[g["goid"]] for g in manifest["goroutines"] if g["func"] == "main.fanout"]
    cut = [s for s in fanouts if s.trace_id != dispatcher.trace_id]
    assert len(cut) >= len(fanouts) - 2 >= 20
    assert len({s.trace_id for s in cut}) == len(cut)  # a trace each, as before
    assert all(s.attributes["go.goroutine.trace_reason"] == "spawner" and s.parent_span_id == "" for s in cut)
    for g in manifest["goroutines"]:
        if g["func"] == "main.part":  # in its fanout's trace, its child
            part, fanout = goroutines[g["goid"]], goroutines[g["parent"]]
            assert (part.trace_id, part.parent_span_id) == (fanout.trace_id, fanout.span_id)


def test_the_run_makes_few_traces(traced):
    """Every trace of the run, by what roots it: a group per spawner per window, a fanout each, the
    program's own tree (runtime.main, which holds the spawners) and the runtime's goroutines that
    have no traced creator. The short goroutines alone would have made a trace each."""
    final, manifest = traced["final"], traced["manifest"]
    roots = [s for s in final if not s.parent_span_id]
    assert len(roots) == len({s.trace_id for s in final})  # one root a trace
    kinds = Counter("group" if "go.goroutine.group.goroutines" in s.attributes else s.attributes.get("go.goroutine.trace_reason")
                    for s in roots)
    windows = math.ceil((manifest["stopped"] - manifest["started"]) / 1e9 / WINDOW_S) + 1
    fanouts = sum(g["func"] == "main.fanout" for g in manifest["goroutines"])
    assert kinds["group"] <= 2 * windows and kinds["spawner"] <= fanouts
    # None: runtime.main, created by no goroutine (no trace reason)
    assert set(kinds) <= {"group", "spawner", "untraced_parent", None} and kinds["untraced_parent"] <= 8 and kinds[None] <= 1
    short = sum(g["func"] in ("main.beat", "main.work") for g in manifest["goroutines"])
    assert len(roots) <= 2 * windows + fanouts + 8 + 1 < short
    grouped = sum(s.attributes.get("go.goroutine.trace_reason") == "grouped" for s in final)
    assert f"short goroutines of spawners: {grouped} in {kinds['group']} group traces" in traced["err"]
