"""Bad input gives one clear line and a non-zero status, never a traceback."""

import json
import re
from collections import Counter
import shutil
import subprocess
import time

import pytest

from helpers import AGENT, build_program, by_goid, free_port, go_release, run_agent, spans_from_otlp_json

pytestmark = pytest.mark.ebpf


def _one_line_error(run, *needles):
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("otel-goroutines: error: "), run.stderr
    for needle in needles:
        assert needle in lines[0], run.stderr


def test_no_such_pid():
    _one_line_error(run_agent(["attach", "999999"]), "no process with PID 999999")


def test_pid_of_a_non_go_program():
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        _one_line_error(run_agent(["attach", str(sleeper.pid)]), "not a Go program")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_program_that_is_not_elf(tmp_path):
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    _one_line_error(run_agent(["run", "--", str(script)]), "not an ELF executable")


def test_program_not_found():
    _one_line_error(run_agent(["run", "--", "no-such-program-here"]), "program not found")


def test_inspect_non_go_binary():
    _one_line_error(run_agent(["inspect", shutil.which("ls")]), "not a Go program")


def test_not_root(programs):
    # As an unprivileged user the agent cannot load probes; it says so in one line, before launching anything.
    run = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                          *AGENT, "run", "--exporter", "console", "--", str(programs["ticker"]), "/nonexistent/m.json", "1s"],
                         capture_output=True, text=True, timeout=60)
    _one_line_error(run, "needs root")


def test_program_that_panics_at_its_end(programs, tmp_path):
    out = tmp_path / "spans.jsonl"
    run = run_agent(["run", "-q", "-o", str(out), "--", str(programs["tree"])])  # no manifest argument: it panics writing it
    assert run.returncode == 2 and "index out of range" in run.stderr
    assert "Traceback" not in run.stderr
    # The file holds the whole tree, one span per goroutine seen, and says so.
    spans = by_goid(spans_from_otlp_json(out))
    seen = int(re.search(r"^goroutines seen: (\d+)$", run.stderr, re.M)[1])
    assert re.search(rf"^(\d+) spans written to {re.escape(str(out))}$", run.stderr, re.M)[1] == str(seen) == str(len(spans))
    names = Counter(s.name for s in spans.values())
    assert {k: names[k] for k in ("main.worker", "main.leaf", "main.selector", "main.locker", "main.stuck", "runtime.main")} == \
        {"main.worker": 3, "main.leaf": 6, "main.selector": 1, "main.locker": 1, "main.stuck": 2, "runtime.main": 1}
    main = next(s for s in spans.values() if s.name == "runtime.main")
    assert main.attributes["go.goroutine.end_reason"] == "process_exited" and main.parent_span_id == ""


def test_collector_down_keeps_tracing_and_counts_the_loss(programs, tmp_path):
    dead_port = free_port()  # nothing listens there
    started = time.monotonic()
    run = run_agent(["run", "--endpoint", f"http://127.0.0.1:{dead_port}", "--protocol", "grpc", "-q",
                     "--flush-timeout", "2", "--", str(programs["tree"]), str(tmp_path / "m.json"), "4"])
    assert run.returncode == 4  # the program ran to its end, traced
    assert time.monotonic() - started < 30
    assert "Traceback" not in run.stderr
    assert "span export failed" in run.stderr
    # The summary counts every span that could not be sent: here all of them, one per goroutine seen
    # (the program's own, runtime.main and the runtime's), and none went out.
    seen = int(re.search(r"^goroutines seen: (\d+)$", run.stderr, re.M)[1])
    manifest = json.loads((tmp_path / "m.json").read_text())
    assert seen >= len(manifest["goroutines"]) + 1
    assert re.search(r"^dropped or degraded: .*\bspans_not_exported=(\d+)\b", run.stderr, re.M)[1] == str(seen)
    assert re.search(r"^(\d+) spans exported over OTLP \(grpc\)$", run.stderr, re.M)[1] == "0"


def test_binary_for_another_architecture_is_refused(tmp_path):
    arm64 = build_program("tree", goarch="arm64")  # a real Go binary, cross-built
    _one_line_error(run_agent(["inspect", str(arm64)]), "is built for EM_AARCH64; only amd64 (x86-64) is supported")
    _one_line_error(run_agent(["run", "--", str(arm64), str(tmp_path / "m.json")]), "only amd64 (x86-64) is supported")
    assert not (tmp_path / "m.json").exists()


def test_go_older_than_supported_is_refused(tmp_path):
    # Go 1.16 cannot be installed here: a Go 1.19 build whose version strings (.go.buildinfo and
    # runtime.buildVersion, same length) say go1.16 instead.
    go119 = build_program("tree", go=go_release("1.19"))
    data = go119.read_bytes()
    version = re.search(rb"go1\.19(\.\d+)?", data)[0]
    old = tmp_path / "tree-go1.16"
    old.write_bytes(data.replace(version, version.replace(b"go1.19", b"go1.16")))
    old.chmod(0o755)
    wanted = f"was built with {version.decode().replace('go1.19', 'go1.16')}; Go 1.17 or later is required"
    _one_line_error(run_agent(["inspect", str(old)]), wanted)
    _one_line_error(run_agent(["run", "--", str(old), str(tmp_path / "m.json")]), wanted)
    assert not (tmp_path / "m.json").exists()  # refused before the program ran
