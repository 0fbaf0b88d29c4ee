"""`otel-goroutines run` on real Go programs, real uprobes, spans through a real collector (rotel)."""

import json

import pytest

from helpers import by_goid, of_run, run_agent, run_marker, site_line

pytestmark = pytest.mark.ebpf


def _trace_tree(programs, rotel, receiver, tmp_path, protocol, exit_code=0):
    receiver.clear()
    manifest_path = tmp_path / "manifest.json"
    marker, env = run_marker()  # the goroutine ids are the same in every run of the tree
    run = run_agent(["run", "--endpoint", rotel.endpoint(protocol), "--protocol", protocol, "--quiet", "--",
                     str(programs["tree"]), str(manifest_path), str(exit_code)], env=env)
    manifest = json.loads(manifest_path.read_text())
    expected = {g["goid"] for g in manifest["goroutines"]} | {manifest["main_goid"]}
    spans = of_run(receiver.wait_for(lambda got: expected <= {s.attributes["go.goroutine.id"] for s in of_run(got, marker)}), marker)
    return run, manifest, spans


@pytest.fixture(scope="module", params=["grpc", "http/protobuf"])
def traced_tree(request, programs, rotel, receiver, tmp_path_factory):
    return _trace_tree(programs, rotel, receiver, tmp_path_factory.mktemp("tree"), request.param)


def test_every_goroutine_once_with_parent_name_and_site(traced_tree):
    run, manifest, spans = traced_tree
    assert run.returncode == 0, run.stderr
    spans_by_goid = by_goid(spans)  # asserts no goroutine was exported twice
    main_goid = manifest["main_goid"]
    assert spans_by_goid[main_goid].name == "runtime.main"
    assert spans_by_goid[main_goid].parent_span_id == ""  # the root of the tree
    assert len({s.trace_id for s in spans}) == 1
    for g in manifest["goroutines"]:
        span = spans_by_goid[g["goid"]]
        assert span.name == g["func"]
        assert span.attributes["code.function.name"] == g["func"]
        assert span.attributes["go.goroutine.parent_id"] == g["parent"]
        assert span.parent_span_id == spans_by_goid[g["parent"]].span_id
        assert span.attributes["code.file.path"].endswith("tree/main.go")
        assert span.attributes["code.line.number"] == site_line("tree", g["site"])
        assert span.attributes["go.goroutine.created_by"] == ("main.worker" if g["func"] == "main.leaf" else "main.main")


def test_lifetimes_within_what_the_program_measured(traced_tree):
    _, manifest, spans = traced_tree
    spans_by_goid = by_goid(spans)
    for g in manifest["goroutines"]:
        span = spans_by_goid[g["goid"]]
        assert g["spawned"] <= span.start_ns <= g["started"], g
        if g["func"] == "main.stuck":
            continue
        # Joined: once the program saw every goroutine but the stuck ones finish exiting.
        assert g["joined"], f"the program did not see {g['func']} finish exiting"
        assert g["ended"] <= span.end_ns <= g["joined"], g
        assert span.attributes["go.goroutine.end_reason"] == "exited"


def test_waits_carry_the_runtime_wait_reason(traced_tree):
    _, manifest, spans = traced_tree
    spans_by_goid = by_goid(spans)
    for g in manifest["goroutines"]:
        reasons = [attrs.get("go.goroutine.wait_reason") for name, _, attrs in spans_by_goid[g["goid"]].events if name == "waiting"]
        if g.get("waits_on"):
            assert g["waits_on"] in reasons, (g, reasons)
        if g["func"] == "main.worker":
            assert "sleep" in reasons


def test_state_events_and_totals(traced_tree):
    _, manifest, spans = traced_tree
    spans_by_goid = by_goid(spans)
    leaf = next(spans_by_goid[g["goid"]] for g in manifest["goroutines"] if g["func"] == "main.leaf")
    names = [name for name, _, _ in leaf.events]
    assert names[0] == "running" and "waiting" in names and names[-1] == "exited"
    times = [t for _, t, _ in leaf.events]
    assert times == sorted(times) and leaf.start_ns <= times[0] and times[-1] == leaf.end_ns
    attrs = leaf.attributes
    assert attrs["go.goroutine.transitions"] == len(names) - 1
    assert attrs["go.goroutine.events_left_out"] == 0
    # The leaf waited about 50 ms for its channel; time in states adds up to its lifetime.
    assert attrs["go.goroutine.waiting_ns"] > 10_000_000
    total = sum(v for k, v in attrs.items() if k.endswith("_ns"))
    assert total == leaf.end_ns - leaf.start_ns


def test_goroutines_alive_at_exit_are_ended_and_marked(traced_tree):
    _, manifest, spans = traced_tree
    spans_by_goid = by_goid(spans)
    main_span = spans_by_goid[manifest["main_goid"]]
    for g in manifest["goroutines"]:
        if g["func"] == "main.stuck":
            span = spans_by_goid[g["goid"]]
            assert span.attributes["go.goroutine.end_reason"] == "process_exited"
            assert span.attributes["go.goroutine.alive_at_end"] is True
            assert span.end_ns == main_span.end_ns  # all end at the process's exit
            assert span.events[-1][0] == "process_exited"


def test_resource_describes_the_target(traced_tree, programs):
    _, _, spans = traced_tree
    resource = spans[0].resource
    assert resource["service.name"] == programs["tree"].name
    assert resource["process.runtime.name"] == "go"
    assert resource["process.runtime.version"].startswith("go1.")
    assert resource["process.executable.path"] == str(programs["tree"])
    assert len({s.resource["process.pid"] for s in spans}) == 1


def test_process_pid_is_the_targets(programs, rotel, receiver, tmp_path):
    """process.pid is the PID the target itself reported (the ticker writes os.Getpid())."""
    receiver.clear()
    manifest_path = tmp_path / "ticker.json"
    marker, env = run_marker()
    run = run_agent(["run", "--endpoint", rotel.endpoint("grpc"), "--protocol", "grpc", "-q", "--",
                     str(programs["ticker"]), str(manifest_path), "300ms"], env=env)
    assert run.returncode == 0, run.stderr
    manifest = json.loads(manifest_path.read_text())
    ticks = {g["goid"] for g in manifest["goroutines"]}
    assert ticks
    spans = of_run(receiver.wait_for(lambda got: ticks <= {s.attributes["go.goroutine.id"] for s in of_run(got, marker)}), marker)
    assert ticks <= {s.attributes["go.goroutine.id"] for s in spans}
    assert {s.resource["process.pid"] for s in spans} == {manifest["pid"]}


def test_exit_status_follows_the_program(programs, rotel, receiver, tmp_path):
    run, manifest, spans = _trace_tree(programs, rotel, receiver, tmp_path, "grpc", exit_code=3)
    assert run.returncode == 3
    assert manifest["exit_code"] == 3
    assert {g["goid"] for g in manifest["goroutines"]} <= set(by_goid(spans))


def test_panicking_target_still_has_its_spans(programs, rotel, receiver, tmp_path):
    receiver.clear()
    manifest_path = tmp_path / "manifest.json"
    marker, env = run_marker()
    run = run_agent(["run", "--endpoint", rotel.endpoint("grpc"), "--protocol", "grpc", "-q", "--",
                     str(programs["panicker"]), str(manifest_path)], env=env)
    assert run.returncode == 2  # Go's exit status for an unrecovered panic
    assert "fixture panic" in run.stderr
    manifest = json.loads(manifest_path.read_text())
    want = {g["goid"] for g in manifest["goroutines"]}
    spans = by_goid(of_run(receiver.wait_for(lambda got: want <= {s.attributes["go.goroutine.id"] for s in of_run(got, marker)}
                                             and any(s.name == "main.doomed" for s in of_run(got, marker))), marker))
    for goid in want:
        assert spans[goid].attributes["go.goroutine.end_reason"] == "process_exited"
    doomed = next(s for s in spans.values() if s.name == "main.doomed")
    assert doomed.attributes["go.goroutine.alive_at_end"] is True


def test_status_line_keeps_clear_of_the_programs_output(tmp_path):
    """On a terminal the program under `run` writes to the same screen as the live status line: a
    terminal emulator (pyte) fed what the terminal got shows every line of the program whole, the
    status never written into one, and the status gone from the screen at the end."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import termios

    import pyte

    from helpers import AGENT, build_program
    lines, rows, cols = 30, 24, 100
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    agent = subprocess.Popen(AGENT + ["run", "--exporter", "file", "--output", str(tmp_path / "spans.jsonl"), "--",
                                      str(build_program("chatty")), str(lines)],
                             stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    got = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every writer is gone
            break
        if not chunk:
            break
        got += chunk
    os.close(master)
    assert agent.wait(30) == 0, got.decode(errors="replace")
    assert got.count(b"goroutines live") >= 2, got  # the status line was up while the program wrote
    screen = pyte.HistoryScreen(cols, rows, history=1000)
    stream = pyte.ByteStream(screen)
    stream.feed(got)
    history = [("".join(line[x].data for x in range(cols))).rstrip() for line in screen.history.top]
    everything = history + [screen.display[y].rstrip() for y in range(rows)]
    program = [line for line in everything if "chatty line" in line]
    assert program == [f"chatty line {n} of the program" for n in range(1, lines + 1)], everything
    assert not [line for line in screen.display if "goroutines live" in line], screen.display
