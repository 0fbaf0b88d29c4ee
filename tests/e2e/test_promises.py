"""Promises of the README that no other test file holds the agent to, each on real probes and
compared with what the fixture recorded about itself (tests/programs/promises,
tests/programs/appservice/spandepth, the ticker and allocchurn):

- export: a collector started after the agent gets every span (retried with backoff); with the
  collector down the buffer keeps 200,000 spans and counts the rest, exactly;
- the kernel's map full: goroutines over --max-goroutines counted as untracked, exactly;
- the default --spawner-age (1 s): a creator's age alone makes it a spawner;
- limits: the newest 8 active SDK spans of a goroutine, the first 8 pprof labels (keys cut at 32
  bytes, values at 64);
- `watch` with several targets flushes them all within one --shutdown-timeout; a second signal
  stops at once;
- refused in one line before anything runs: gccgo builds, other architectures than amd64/arm64.
"""

from __future__ import annotations

import json
import os
import re
import signal
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from fake_collectors import SilentCollector
from helpers import (AGENT, ROOT, OtlpHttpReceiver, Rotel, build_appservice, build_program, by_goid, free_port, go_release,
                     of_run, poll, run_agent, run_marker, spans_from_otlp_json)

pytestmark = pytest.mark.ebpf


def _summary(stderr: str) -> dict[str, int]:
    """The figures of the agent's summary: seen, created, alive (at the end), each start function's
    count (by name) and every loss it names."""
    figures = {"seen": int(re.search(r"^goroutines seen: (\d+)$", stderr, re.M)[1])}
    if created := re.search(r"^goroutines created while traced: (\d+)$", stderr, re.M):
        figures["created"] = int(created[1])
    rows = re.findall(r"^  (\S+) +(\d+) +(\d+) +[\d.]+ \S+ +[\d.]+ \S+$", stderr, re.M)
    figures["alive"] = sum(int(alive) for _, _, alive in rows)
    figures.update({name: int(count) for name, count, _ in rows})
    for degraded in re.findall(r"^(?:dropped or degraded|application spans degraded): (.*)$", stderr, re.M):
        for item in degraded.split(", "):
            name, value = item.split("=")
            figures[name] = int(value)
    return figures


def _one_line_error(run, *needles):
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and len(lines) == 1 and lines[0].startswith("otel-goroutines: error: "), run.stderr
    for needle in needles:
        assert needle in lines[0], run.stderr


def _wait_for_line(log: Path, needle: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    assert poll(lambda: needle in log.read_text() or proc.poll() is not None, timeout), f"{needle!r} never logged"
    assert needle in log.read_text(), f"the agent ended before {needle!r}:\n{log.read_text()}"


# --- export ------------------------------------------------------------------------------------

def test_a_collector_started_late_gets_every_span(programs, receiver, tmp_path):
    """The collector is not there when the first spans are exported; started then (a real one, on
    the port the agent sends to), it gets every goroutine's span once, and nothing is counted lost."""
    grpc_port, http_port = free_port(), free_port()
    marker, env = run_marker()
    log, manifest = tmp_path / "agent.log", tmp_path / "ticker.json"
    with open(log, "w") as out:
        agent = subprocess.Popen([*AGENT, "run", "-q", "--endpoint", f"http://127.0.0.1:{grpc_port}", "--protocol", "grpc",
                                  "--metrics-interval", "0", "--flush-timeout", "60", "--",
                                  str(programs["ticker"]), str(manifest), "3s"],
                                 stderr=out, stdout=subprocess.DEVNULL, env={**os.environ, **env})
    rotel = None
    try:
        # An export was tried and refused: the SDK exporter's own retries (with backoff, within
        # the call) or the agent's buffer (retried with backoff) take it from there.
        _wait_for_line(log, "Transient error StatusCode.UNAVAILABLE", agent)
        rotel = Rotel(receiver.port, tmp_path / "rotel.log", ports=(grpc_port, http_port))
        assert agent.wait(120) == 0, log.read_text()
    finally:
        if agent.poll() is None:
            agent.kill()
        if rotel is not None:
            rotel.close()
    stderr = log.read_text()
    assert "nothing dropped" in stderr, stderr
    seen = _summary(stderr)["seen"]
    spans = by_goid(of_run(receiver.wait_for(lambda got: len(of_run(got, marker)) >= seen, 30), marker))
    assert len(spans) == seen
    ticks = {g["goid"] for g in json.loads(manifest.read_text())["goroutines"]}
    assert ticks == {goid for goid, s in spans.items() if s.name == "main.tick"}


BUFFER = 200_000  # the export buffer's bound (pipeline.ExportPipeline)


def test_the_export_buffer_keeps_200000_spans_and_counts_the_rest(tmp_path):
    """More goroutines than the buffer holds end while the collector is down; a collector started
    once the agent has handed every span to the exporter gets exactly 200,000, and every other
    span is counted in spans_not_exported."""
    handlers = BUFFER + 10_000
    grpc_port, http_port = free_port(), free_port()
    receiver = OtlpHttpReceiver(keep_spans=False)
    log = tmp_path / "agent.log"
    with open(log, "w") as out:
        agent = subprocess.Popen([*AGENT, "-v", "run", "-q", "--detail", "lifecycle", "--allocs", "off", "--exporter", "otlp",
                                  "--protocol", "http/protobuf", "--endpoint", f"http://127.0.0.1:{http_port}",
                                  "--metrics-interval", "0", "--flush-timeout", "120", "--group-window", "0", "--", str(build_program("allocchurn")),
                                  "-n", str(handlers), "-batch", "1000", "-allocs", "0", "-warmup", "0", "-settle", "0"],
                                 stderr=out, stdout=subprocess.DEVNULL)
    rotel = None
    try:
        _wait_for_line(log, "every span is handed to the exporter", agent, timeout=180)
        rotel = Rotel(receiver.port, tmp_path / "rotel.log", ports=(grpc_port, http_port))
        assert agent.wait(180) == 0, log.read_text()
        f = _summary(log.read_text())
        received = receiver.wait_for_count(f["seen"], 60)
    finally:
        if agent.poll() is None:
            agent.kill()
        if rotel is not None:
            rotel.close()
        receiver.close()
    assert f["main.handler"] == handlers and f["seen"] > handlers
    assert received + f["spans_not_exported"] == f["seen"], log.read_text()
    assert received == BUFFER, (received, f)


# --- the kernel's accounting -----------------------------------------------------------------------

def test_goroutines_over_the_map_capacity_are_counted_as_untracked(tmp_path):
    """With room for 256 goroutines in the kernel map and 1,000 alive at once, the ones that found
    it full have no span and are counted: spans of main.handler + untracked = the 3,000 handlers
    the program started, exactly."""
    handlers, out = 3000, tmp_path / "spans.jsonl"
    run = run_agent(["run", "-q", "--max-goroutines", "256", "--group-window", "0", "--allocs", "off", "--exporter", "file", "--output", str(out),
                     "--", str(build_program("allocchurn")), "-n", str(handlers), "-batch", "1000", "-allocs", "0",
                     "-warmup", "0", "-settle", "0"], timeout=120)
    assert run.returncode == 0, run.stderr
    f = _summary(run.stderr)
    untracked = f.get("goroutines_untracked_map_full", 0)
    assert untracked > 0, run.stderr
    assert f["main.handler"] + untracked == handlers, run.stderr
    assert f["seen"] == f["created"] - untracked
    spans = spans_from_otlp_json(out)
    assert len(spans) == f["seen"] and sum(s.name == "main.handler" for s in spans) == f["main.handler"]


# --- trace boundaries ------------------------------------------------------------------------------

def test_default_spawner_age(tmp_path):
    """main.elder starts three children (far under the default --spawner-children) at its own ages
    0, 0.7 s and 1.3 s: a child created while its creator is at most 1 s old joins its trace, a
    later one starts a trace of its own, linked. The ages are bracketed by the clock readings
    the program took around each `go` statement and each goroutine's first statement."""
    out, manifest = tmp_path / "spans.jsonl", tmp_path / "m.json"
    # --group-shorter-than 0: no groups of short goroutines (test_trace_cuts): the last child, cut from
    # the elder, would join the elder's group whenever its wg.Done() ran before the elder's wg.Wait()
    # (then it woke nobody), which the schedule decides (it did so once under load).
    run = run_agent(["run", "-q", "--group-shorter-than", "0", "--exporter", "file", "--output", str(out), "--",
                     str(build_program("promises")), "spawner", str(manifest)])
    assert run.returncode == 0, run.stderr
    spans = by_goid(spans_from_otlp_json(out))
    (elder, *children) = json.loads(manifest.read_text())["goroutines"]
    elder_span = spans[elder["goid"]]
    verdicts = []
    for child in children:
        youngest, oldest = child["spawned"] - elder["started"], child["started"] - elder["spawned"]
        assert oldest <= 1e9 or youngest > 1e9, f"cannot tell the elder's age at that child: {youngest}-{oldest} ns"
        span = spans[child["goid"]]
        if oldest <= 1e9:
            assert (span.trace_id, span.parent_span_id) == (elder_span.trace_id, elder_span.span_id), (child, span, run.stderr)
            assert "go.goroutine.trace_reason" not in span.attributes
        else:
            assert span.parent_span_id == "" and span.trace_id != elder_span.trace_id, (child, span, run.stderr)
            assert span.attributes["go.goroutine.trace_reason"] == "spawner"
            assert span.links[0][:2] == (elder_span.trace_id, elder_span.span_id)
        verdicts.append(oldest <= 1e9)
    assert verdicts == [True, True, False]


# --- limits ----------------------------------------------------------------------------------------

def test_the_newest_8_active_sdk_spans_are_remembered(tmp_path):
    """main.deep nests 10 SDK spans: a goroutine started under the 10th is its child; under the 3rd
    (once 10..4 ended), the 3rd's child; once the 3rd ended, the two outer spans still active were
    forgotten (counted): that goroutine follows its creator's goroutine span instead."""
    out, manifest_path = tmp_path / "spans.jsonl", tmp_path / "m.json"
    run = run_agent(["run", "-q", "--exporter", "file", "--output", str(out), "--",
                     str(build_appservice(package="./spandepth")), str(manifest_path)])
    assert run.returncode == 0, run.stderr
    manifest = json.loads(manifest_path.read_text())
    spans = by_goid(spans_from_otlp_json(out))
    ids, goroutines = manifest["span_ids"], manifest["goroutines"]
    for name, parent in (("main.under10", ids[9]), ("main.under3", ids[2])):
        span = spans[goroutines[name]]
        assert (span.trace_id, span.parent_span_id) == (manifest["trace_id"], parent), name
        assert span.attributes["go.goroutine.trace_reason"] == "application_span"
    forgotten, deep = spans[goroutines["main.under2"]], spans[manifest["deep_goid"]]
    assert (forgotten.trace_id, forgotten.parent_span_id) == (deep.trace_id, deep.span_id)
    assert "go.goroutine.trace_reason" not in forgotten.attributes
    assert _summary(run.stderr)["app_spans_forgotten_too_deep"] == 2


@pytest.mark.parametrize("go", ["default", "1.23"])
def test_the_first_8_pprof_labels(tmp_path, go):
    """main.labelled ends with 10 labels, set in reverse order: from Go 1.24 (a slice, sorted by key)
    it gets the first 8 by key; up to Go 1.23 (a map, read only while it fits one bucket of 8) none.
    The summary counts those left out. main.longlabel's 40-byte key and 70-byte value are cut at 32
    and 64 bytes, marked "..."."""
    out, manifest = tmp_path / "spans.jsonl", tmp_path / "m.json"
    program = build_program("promises", go=None if go == "default" else go_release(go))
    run = run_agent(["run", "-q", "--exporter", "file", "--output", str(out), "--", str(program), "labels", str(manifest)])
    assert run.returncode == 0, run.stderr
    spans = by_goid(spans_from_otlp_json(out))
    labels = {g["func"]: {k.removeprefix("go.goroutine.label."): v for k, v in spans[g["goid"]].attributes.items()
                          if k.startswith("go.goroutine.label.")}
              for g in json.loads(manifest.read_text())["goroutines"]}
    kept = 8 if go == "default" else 0
    assert labels["main.labelled"] == {f"k{i}": f"v{i}" for i in range(kept)}
    assert labels["main.longlabel"] == {"k" * 32 + "...": "v" * 64 + "..."}
    assert re.search(r"^goroutines with pprof labels: 2 \(labels_left_out=(\d+)\)$", run.stderr, re.M)[1] == str(10 - kept)


# --- watch: shutdown -------------------------------------------------------------------------------

class _Watch:
    """`watch` over copies of the ticker named NAME-*, exporting to a collector that never answers."""

    def __init__(self, tmp_path: Path, programs, targets: int, shutdown_timeout: float, endpoint: str):
        self.log = tmp_path / "agent.log"
        name = f"ticker-{tmp_path.name}"
        with open(self.log, "w") as out:
            self.agent = subprocess.Popen([*AGENT, "watch", "-q", "--scan-interval", "0.2", "--exe-path", f"{tmp_path}/{name}-*",
                                           "--endpoint", endpoint, "--shutdown-timeout", str(shutdown_timeout), "--group-window", "0"],
                                          stdout=out, stderr=subprocess.STDOUT)
        self.targets = []
        for n in range(targets):
            binary = tmp_path / f"{name}-{n}"
            shutil.copy(programs["ticker"], binary)
            self.targets.append(subprocess.Popen([str(binary), str(tmp_path / f"m{n}.json"), "120s"]))
        for target in self.targets:
            _wait_for_line(self.log, f"tracing PID {target.pid}", self.agent)

    def close(self) -> None:
        for proc in (self.agent, *self.targets):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_watch_flushes_several_targets_within_one_shutdown_timeout(programs, tmp_path):
    """Three targets, a collector that never answers, --shutdown-timeout 6 (each target's own
    --flush-timeout is 10 s): on SIGTERM the agent detaches all three, counts each one's unsent
    spans, and is gone within the 6 s (plus slack for detaching), the targets still running."""
    with SilentCollector() as collector:
        watch = _Watch(tmp_path, programs, 3, 6, collector.endpoint)
        try:
            time.sleep(1)  # spans pile up for the collector that never answers
            started = time.monotonic()
            watch.agent.send_signal(signal.SIGTERM)
            assert watch.agent.wait(60) == 0
            elapsed = time.monotonic() - started
            log = watch.log.read_text()
            assert all(t.poll() is None for t in watch.targets)
        finally:
            watch.close()
    assert elapsed < 6 + 4, log
    for target in watch.targets:
        assert f"PID {target.pid} ({tmp_path}/" in log and "no longer traced" in log
    summaries = log.split("goroutines seen: ")[1:]
    assert len(summaries) == 3, log
    for summary in summaries:  # every span of each target counted as not exported
        seen = int(summary.split("\n", 1)[0])
        assert re.search(r"spans_not_exported=(\d+)", summary)[1] == str(seen), log
    assert "Traceback" not in log


def test_watch_stops_at_once_on_a_second_signal(programs, tmp_path):
    """SIGTERM starts a flush that could take the whole --shutdown-timeout (60 s, the collector never
    answers); a second SIGTERM ends it at once: the agent exits with 130, the targets untouched."""
    with SilentCollector() as collector:
        watch = _Watch(tmp_path, programs, 2, 60, collector.endpoint)
        try:
            time.sleep(1)
            watch.agent.send_signal(signal.SIGTERM)
            _wait_for_line(watch.log, "stopping (flushing for at most 60 s)", watch.agent)
            started = time.monotonic()
            watch.agent.send_signal(signal.SIGTERM)
            code = watch.agent.wait(60)
            elapsed = time.monotonic() - started
            assert all(t.poll() is None for t in watch.targets)
        finally:
            watch.close()
    log = watch.log.read_text()
    assert code == 130 and "otel-goroutines: error: interrupted" in log, log
    assert elapsed < 10, log  # far under the 60 s the flush could have taken
    assert "Traceback" not in log


# --- refused in one line ---------------------------------------------------------------------------

HELLO = """package main

import "os"

func main() {
	done := make(chan bool)
	go func() { done <- true }()
	<-done
	os.WriteFile(os.Args[1], []byte("ran"), 0o644)
}
"""


def test_gccgo_build_is_refused(tmp_path):
    """A real gccgo build (Debian's gccgo-12, unpacked by scripts/gccgo.sh)."""
    gccgo = subprocess.run([str(ROOT / "scripts" / "gccgo.sh")], check=True, capture_output=True, text=True).stdout.strip()
    (tmp_path / "hello.go").write_text(HELLO)
    binary, ran = tmp_path / "hello", tmp_path / "ran"
    subprocess.run([gccgo, "-o", str(binary), str(tmp_path / "hello.go")], check=True)
    subprocess.run([str(binary), str(ran)], check=True)
    assert ran.read_text() == "ran"  # it is a working Go program
    ran.unlink()
    wanted = f"{binary} was built by gccgo; only the gc toolchain is supported"
    _one_line_error(run_agent(["inspect", str(binary)]), wanted)
    _one_line_error(run_agent(["run", "--", str(binary), str(ran)]), wanted)
    assert not ran.exists()  # refused before the program ran


@pytest.mark.parametrize("goarch,machine", [("riscv64", "EM_RISCV"), ("386", "EM_386")])
def test_other_architectures_are_refused(tmp_path, goarch, machine):
    binary = build_program("tree", goarch=goarch)
    wanted = f"{binary} is built for {machine}; only amd64 (x86-64) and arm64 are supported"
    _one_line_error(run_agent(["inspect", str(binary)]), wanted)
    _one_line_error(run_agent(["run", "--", str(binary), str(tmp_path / "m.json")]), wanted)
    assert not (tmp_path / "m.json").exists()
