"""Bad input gives one clear line and a non-zero status, never a traceback."""

import shutil
import subprocess
import time

import pytest

from helpers import AGENT, by_goid, free_port, run_agent

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


def test_program_that_exits_at_once(programs, tmp_path):
    out = tmp_path / "spans.jsonl"
    run = run_agent(["run", "-q", "-o", str(out), "--", str(programs["tree"])])  # no manifest argument: it panics at once
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert out.exists()


def test_collector_down_keeps_tracing_and_counts_the_loss(programs, tmp_path):
    dead_port = free_port()  # nothing listens there
    started = time.monotonic()
    run = run_agent(["run", "--endpoint", f"http://127.0.0.1:{dead_port}", "--protocol", "grpc", "-q",
                     "--flush-timeout", "2", "--", str(programs["tree"]), str(tmp_path / "m.json"), "4"])
    assert run.returncode == 4  # the program ran to its end, traced
    assert time.monotonic() - started < 30
    assert "Traceback" not in run.stderr
    assert "span export failed" in run.stderr
    assert "spans_not_exported=" in run.stderr  # the summary counts what could not be sent
