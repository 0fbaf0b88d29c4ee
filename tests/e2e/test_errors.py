"""Bad input gives one clear line and a non-zero status, never a traceback; a misbehaving
collector costs at most --flush-timeout at the end."""

import json
import os
import re
from collections import Counter
import shutil
import subprocess
import time

import pytest

from fake_collectors import GrpcHangingCollector, Http503Collector, SilentCollector
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


def test_binary_for_another_architecture_is_inspected_not_traced(tmp_path):
    arm64 = build_program("tree", goarch="arm64")  # a real Go binary, cross-built (tests/unit/test_arm64.py: its plan)
    inspected = run_agent(["inspect", str(arm64)])
    assert inspected.returncode == 0 and "inspect only: this machine is amd64" in inspected.stdout
    _one_line_error(run_agent(["run", "--", str(arm64), str(tmp_path / "m.json")]),
                    "is built for arm64; this machine is amd64: `otel-goroutines inspect` can read it here, "
                    "tracing it needs an arm64 machine")
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


FLUSH_TIMEOUT = 6.0  # long enough that the old 2x (spans, then metrics) cannot pass
SLACK = 5.0  # detaching, the summary, interpreter exit: generous, the bound is what is tested


@pytest.mark.parametrize("collector,protocol", [
    (SilentCollector, "http/protobuf"), (SilentCollector, "grpc"),
    (Http503Collector, "http/protobuf"), (GrpcHangingCollector, "grpc")])
def test_flush_timeout_bounds_the_exit(programs, tmp_path, collector, protocol):
    """Whatever the collector does, the agent is gone within --flush-timeout (plus slack) of the
    program's end, spans and the final metrics export together, and every unsent span is counted."""
    manifest = tmp_path / "m.json"
    with collector() as peer:
        run = run_agent(["run", "--endpoint", peer.endpoint, "--protocol", protocol, "-q",
                         "--flush-timeout", str(FLUSH_TIMEOUT), "--metrics-interval", "0.2",
                         "--", str(programs["tree"]), str(manifest), "4"])
        agent_gone = time.time()
    assert run.returncode == 4, run.stderr
    assert "Traceback" not in run.stderr
    after_program = agent_gone - os.stat(manifest).st_mtime  # the program writes it as its last act
    assert after_program < FLUSH_TIMEOUT + SLACK, run.stderr
    seen = int(re.search(r"^goroutines seen: (\d+)$", run.stderr, re.M)[1])
    assert re.search(r"^dropped or degraded: .*\bspans_not_exported=(\d+)\b", run.stderr, re.M)[1] == str(seen), run.stderr


@pytest.fixture
def tiny_full_fs(tmp_path):
    """A 64 KiB tmpfs with about 20 KiB left: less than the spans of one tree run take."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        fs = os.statvfs(mount)
        (mount / "filler").write_bytes(b"\0" * (fs.f_bavail * fs.f_frsize - 20 * 1024))
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _whole_json_lines(path):
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"{path} ends in a partial line"
    return [json.loads(line) for line in data.splitlines()]


def test_disk_full_leaves_whole_lines_and_counts_the_loss(programs, tiny_full_fs, tmp_path):
    out = tiny_full_fs / "spans.jsonl"
    run = run_agent(["run", "-q", "-o", str(out), "--flush-timeout", "1", "--",
                     str(programs["tree"]), str(tmp_path / "m.json")])
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    written = sum(len(ss["spans"]) for line in _whole_json_lines(out)
                  for rs in line["resourceSpans"] for ss in rs["scopeSpans"])
    _whole_json_lines(tiny_full_fs / "spans.jsonl.metrics.jsonl")
    seen = int(re.search(r"goroutines seen: (\d+)", run.stderr).group(1))
    lost = int(re.search(r"spans_not_exported=(\d+)", run.stderr).group(1))
    assert lost > 0 and written + lost == seen, run.stderr
    assert f"{written} spans written" in run.stderr


@pytest.mark.parametrize("value", ["localhost:4317", "http://[::1", "ftp://collector:4317"])
@pytest.mark.parametrize("where", ["--endpoint", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"])
def test_bad_endpoint_refused_before_the_program_runs(programs, tmp_path, value, where):
    manifest = tmp_path / "m.json"
    flag = ["--endpoint", value] if where == "--endpoint" else []
    run = run_agent(["run", *flag, "--", str(programs["tree"]), str(manifest)], env={} if flag else {where: value})
    _one_line_error(run, where, repr(value), "like http://")
    assert not manifest.exists()  # the program never ran


def test_bad_header_and_resource_entries_named(programs, tmp_path):
    run = run_agent(["run", "-q", "-o", str(tmp_path / "spans.jsonl"), "--", str(programs["tree"]), str(tmp_path / "m.json")],
                    env={"OTEL_EXPORTER_OTLP_HEADERS": "api-key=1,garbage", "OTEL_RESOURCE_ATTRIBUTES": "team=a,oops"})
    assert run.returncode == 0, run.stderr
    warnings = [line for line in run.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 2, run.stderr  # each said once, in our words
    assert "OTEL_EXPORTER_OTLP_HEADERS: entry 'garbage' ignored" in warnings[0]
    assert warnings[1].startswith("otel-goroutines: WARNING: OTEL_RESOURCE_ATTRIBUTES:") and "oops" in warnings[1]


def test_corrupt_dwarf_falls_back_to_the_generated_offsets(programs, tmp_path):
    """A program runs with its DWARF corrupt (the runtime never reads it): traced with the version's
    generated offsets, said once, every goroutine of the manifest a span."""
    from elftools.elf.elffile import ELFFile
    corrupt, manifest_path, out = tmp_path / "tree", tmp_path / "m.json", tmp_path / "spans.jsonl"
    shutil.copy(programs["tree"], corrupt)
    with open(corrupt, "rb") as f:
        debug_info = ELFFile(f).get_section_by_name(".debug_info")["sh_offset"]
    with open(corrupt, "r+b") as f:
        f.seek(debug_info + 11)  # past the first unit's header: its DIEs
        f.write(b"\xff" * 4096)
    run = run_agent(["run", "-q", "--exporter", "file", "--output", str(out), "--", str(corrupt), str(manifest_path)])
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("unreadable DWARF") == 1 and "struct offsets from the generated table" in run.stderr, run.stderr
    spans = by_goid(spans_from_otlp_json(out))
    manifest = json.loads(manifest_path.read_text())
    assert all(spans[g["goid"]].name == g["func"] for g in manifest["goroutines"])


def test_truncated_go_binary(programs, tmp_path):
    truncated = tmp_path / "tree"
    truncated.write_bytes(programs["tree"].read_bytes()[:1 << 20])
    truncated.chmod(0o755)
    _one_line_error(run_agent(["run", "--", str(truncated)]), str(truncated), "truncated or corrupt")


def test_console_output_that_cannot_be_written(programs, tmp_path):
    manifest = tmp_path / "m.json"
    run = run_agent(["run", "--exporter", "console", "-o", "/proc/x", "--", str(programs["tree"]), str(manifest)])
    _one_line_error(run, "cannot write /proc/x: No such file or directory")
    assert not manifest.exists()


@pytest.mark.parametrize("option", ["--spawner-age", "--flush-timeout", "--metrics-interval"])
def test_nan_and_infinity_refused_by_the_option_parser(programs, option):
    for value in ("nan", "inf"):
        run = run_agent(["run", option, value, "--", str(programs["tree"])])
        assert run.returncode == 2 and f"Invalid value for '{option}': '{value}' is not a finite number" in run.stderr
        assert "unexpected" not in run.stderr and "Traceback" not in run.stderr


def test_exact_allocations_refused_under_a_budget(programs, tmp_path):
    manifest = tmp_path / "m.json"
    run = run_agent(["run", "--allocs", "exact", "--max-overhead", "5", "--", str(programs["tree"]), str(manifest)])
    _one_line_error(run, "--allocs exact traps on every heap allocation")
    assert not manifest.exists()  # refused before the program ran
