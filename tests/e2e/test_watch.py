"""`otel-goroutines watch`: the sidecar mode. The agent starts first; the target starts later in
PID and mount namespaces of its own (as in another container of the pod), from a binary that
only exists in its private tmpfs, so the agent reaches it only through /proc/PID/exe and
/proc/PID/root; it is restarted once; a non-Go process matching the selector is skipped."""

import json
import os
import shutil
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import AGENT, creator_links, free_port, goroutine_spans, group_spans, poll, spans_from_otlp_json, ticks_untraced_after_attach

pytestmark = pytest.mark.ebpf


class Agent:
    def __init__(self, tmp_path: Path, *args: str):
        self.health = tmp_path / "run" / "health.json"
        self.log_path = tmp_path / "agent.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(AGENT + ["watch", "-q", "--scan-interval", "0.2", "--health-file", str(self.health), *args],
                                     stdout=self._log, stderr=subprocess.STDOUT, text=True)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_log(self, needle: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log():
                return self.log()
            assert self.proc.poll() is None, f"the agent ended early:\n{self.log()}"
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} not in the agent's log:\n{self.log()}")

    def health_check(self, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(AGENT + ["health", "--file", str(self.health), *extra], capture_output=True, text=True)

    def stop(self, timeout: float) -> float:
        """SIGTERM; seconds until it exited."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout)
        self._log.close()
        return time.monotonic() - started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def unique_name() -> str:
    """An executable name no other test on this machine runs, so the selectors match only ours."""
    return f"ticker-{secrets.token_hex(4)}"


def start_isolated(binary: Path, name: str, workdir: Path, *args: str) -> subprocess.Popen:
    """BINARY run as PID 1 of a new PID namespace, in a new mount namespace, copied into a tmpfs
    mounted there only: outside, its directory stays empty."""
    private = workdir / "private"
    private.mkdir(exist_ok=True)
    script = f'mount -t tmpfs tmpfs "{private}" && cp "{binary}" "{private}/{name}" && exec "{private}/{name}" "$@"'
    return subprocess.Popen(["unshare", "--pid", "--mount", "--fork", "sh", "-c", script, "sh", *args])


def go_pid_of(unshare: subprocess.Popen, name: str, timeout: float = 10.0) -> int:
    """The host PID of the program unshare started (its only child)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children").read_text().split()
        if children and os.readlink(f"/proc/{children[0]}/exe").endswith(f"/{name}"):
            return int(children[0])
        time.sleep(0.02)
    raise TimeoutError("the isolated program did not start")


@pytest.fixture
def agent_cleanup():
    agents = []
    yield agents.append
    for agent in agents:
        agent.kill()


def test_watch_finds_a_restarted_service_in_other_namespaces(programs, rotel, receiver, tmp_path, agent_cleanup):
    if not shutil.which("unshare"):
        pytest.skip("unshare (util-linux) is missing")
    receiver.clear()
    name = unique_name()
    agent = Agent(tmp_path, "--exe-name", name, "--endpoint", rotel.endpoint("grpc"), "--protocol", "grpc")
    agent_cleanup(agent)
    agent.wait_log(f"watching for executable name '{name}'")
    deadline = time.monotonic() + 10
    while agent.health_check().returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert agent.health_check().returncode == 0, agent.health_check().stderr
    not_yet = agent.health_check("--require-target")
    assert not_yet.returncode == 1 and "traces no process yet" in not_yet.stderr

    # A process whose name matches but that is not Go: skipped, with one log line, once.
    impostor = tmp_path / name
    shutil.copy("/bin/sleep", impostor)
    sleeper = subprocess.Popen([str(impostor), "3"])
    try:
        log = agent.wait_log(f"skipping PID {sleeper.pid} ({impostor}): it is not a Go program")
    finally:
        sleeper.kill()
        sleeper.wait()

    runs = []
    for n in (1, 2):
        workdir = tmp_path / f"run{n}"
        workdir.mkdir()
        manifest = workdir / "manifest.json"
        unshare = start_isolated(programs["ticker"], name, workdir, str(manifest), "120s")
        pid = go_pid_of(unshare, name)
        assert list((workdir / "private").iterdir()) == []  # the binary is not visible from here
        agent.wait_log(f"tracing PID {pid} ({workdir}/private/{name}, go")
        health = agent.health_check("--require-target")
        assert health.returncode == 0, health.stderr
        # Once 50 ticks of this run have come through, however long the attach took, it is stopped
        # (SIGTERM: it writes its manifest and exits by itself).
        ticks_of_run = lambda got: sum(s.name == "main.tick" and s.resource.get("process.pid") == pid for s in got)
        assert ticks_of_run(receiver.wait_for(lambda got: ticks_of_run(got) >= 50, 60)) >= 50, agent.log()
        os.kill(pid, signal.SIGTERM)
        assert unshare.wait(30) == 0
        agent.wait_log(f"PID {pid} ({workdir}/private/{name}) exited")
        runs.append((pid, json.loads(manifest.read_text())))

    elapsed = agent.stop(timeout=30)
    assert agent.proc.returncode == 0
    log = agent.log()
    assert elapsed < 10, log
    assert "Traceback" not in log
    assert log.count("it is not a Go program") == 1
    assert not agent.health.exists()  # removed at a clean exit

    spans = receiver.wait_for(lambda got: {s.resource.get("process.pid") for s in got} >= {pid for pid, _ in runs}, 10)
    for pid, manifest in runs:
        assert manifest["pid"] == 1  # it ran as PID 1 of its own namespace
        received = [s for s in spans if s.resource.get("process.pid") == pid]
        mine, groups = goroutine_spans(received), group_spans(received)
        assert mine, f"no spans for run PID {pid}"
        assert {s.resource["service.name"] for s in mine} == {name}
        by_goid = {}
        for s in mine:
            assert s.attributes["go.goroutine.id"] not in by_goid, "a goroutine exported twice"
            by_goid[s.attributes["go.goroutine.id"]] = s
        ticks = sorted((s for s in mine if s.name == "main.tick"), key=lambda s: s.start_ns)
        tocks = [s for s in mine if s.name == "main.tock"]
        # Traced from the attach to the end: every tick the program spawned after the attach has
        # its span, none missed in between (the program's own list).
        missed, spawned = ticks_untraced_after_attach(manifest, mine)
        assert len(ticks) >= 50 and spawned >= 49 and not missed
        assert {t.attributes["go.goroutine.id"] for t in ticks} <= {g["goid"] for g in manifest["goroutines"]}
        dispatcher = next(s for s in mine if s.name == "main.dispatcher")
        assert {t.attributes["go.goroutine.parent_id"] for t in ticks} == {dispatcher.attributes["go.goroutine.id"]}
        # Each tick starts a tock just before it returns: the tocks of traced ticks are in their trees.
        by_span = {(s.trace_id, s.span_id): s for s in mine}
        parented = [t for t in tocks if t.attributes["go.goroutine.parent_id"] in by_goid]
        assert len(parented) >= len(ticks) - 2
        for tock in parented:
            tick = by_goid[tock.attributes["go.goroutine.parent_id"]]
            assert tick.name == "main.tick"
            if tick.attributes.get("go.goroutine.existed_at_attach"):
                # A tick alive at the attach is a spawner by rule: its tock, short and childless, is in the
                # group of that tick's short goroutines, whose span links to the tick.
                assert tock.attributes["go.goroutine.trace_reason"] == "grouped" and not creator_links(tock)
                group = groups[(tock.trace_id, tock.parent_span_id)]
                assert [l[:2] for l in group.links] == [(tick.trace_id, tick.span_id)]
            else:
                assert by_span[(tock.trace_id, tock.parent_span_id)] is tick
        # It exited by itself: what was still alive then ended with the process.
        assert dispatcher.attributes["go.goroutine.end_reason"] in ("exited", "process_exited")
        assert {s.attributes["go.goroutine.end_reason"] for s in mine} <= {"exited", "process_exited"}


def test_watch_sigterm_flushes_within_the_shutdown_timeout(programs, tmp_path, agent_cleanup):
    """SIGTERM with a live target and a collector that is down: the agent detaches, gives up
    flushing after --shutdown-timeout, and leaves the target running."""
    dead = free_port()
    binary = tmp_path / unique_name()
    shutil.copy(programs["ticker"], binary)
    agent = Agent(tmp_path, "--exe-path", f"{tmp_path}/ticker-*", "--endpoint", f"http://127.0.0.1:{dead}", "--protocol", "grpc",
                  "--shutdown-timeout", "3")
    agent_cleanup(agent)
    agent.wait_log(f"watching for executable path '{tmp_path}/ticker-*'")
    ticker = subprocess.Popen([str(binary), str(tmp_path / "manifest.json"), "60s"])
    try:
        agent.wait_log(f"tracing PID {ticker.pid}")
        time.sleep(1.0)
        elapsed = agent.stop(timeout=30)
        log = agent.log()
        assert agent.proc.returncode == 0, log
        assert elapsed < 3 + 3, log  # the bound, plus the agent's own detach and start-up slack
        assert f"PID {ticker.pid} ({binary}) no longer traced" in log
        assert "0 spans exported over OTLP (grpc)" in log
        assert "Traceback" not in log
        assert ticker.poll() is None  # the target is left running
    finally:
        ticker.terminate()
        ticker.wait(10)


def test_watch_leaves_out_what_an_exclusion_names(programs, tmp_path, agent_cleanup):
    """--exclude-exe-name wins over the selector: of two processes the selector matches, the
    excluded one is said once in the log, counted, and never traced (no probes, no spans)."""
    prefix = unique_name()
    kept, left_out = tmp_path / f"{prefix}-api", tmp_path / f"{prefix}-collector"
    for binary in (kept, left_out):
        shutil.copy(programs["ticker"], binary)
    agent = Agent(tmp_path, "--exe-name", f"{prefix}-*", "--exclude-exe-name", f"{prefix}-coll*",
                  "--exporter", "file", "--output", str(tmp_path / "spans.jsonl"), "--metrics-interval", "0")
    agent_cleanup(agent)
    agent.wait_log(f"watching for executable name '{prefix}-*', except executable name '{prefix}-coll*'")
    procs = [subprocess.Popen([str(b), str(tmp_path / f"{b.name}.json"), "60s"]) for b in (kept, left_out)]
    try:
        agent.wait_log(f"tracing PID {procs[0].pid} ({kept}")
        log = agent.wait_log(f"not tracing PID {procs[1].pid} ({left_out}): excluded by executable name '{prefix}-coll*'")
        assert poll(lambda: json.loads(agent.health.read_text())["counts"].get("traced") == 1, 10), agent.log()
        counts = json.loads(agent.health.read_text())["counts"]
        assert counts["excluded"] == 1 and log.count("not tracing PID") == 1, (counts, log)  # said once, not every scan
        assert agent.health_check("--require-target").returncode == 0
        assert agent.stop(timeout=30) < 30 and agent.proc.returncode == 0
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
    assert f"INFO: tracing PID {procs[1].pid} " not in agent.log() and "Traceback" not in agent.log()
    assert not (tmp_path / f"spans.{procs[1].pid}.jsonl").exists()
    spans = spans_from_otlp_json(tmp_path / f"spans.{procs[0].pid}.jsonl")
    assert any(s.name == "main.tick" for s in spans) and {s.resource["process.pid"] for s in spans} == {procs[0].pid}


def test_watch_with_a_pid_file(programs, rotel, receiver, tmp_path, agent_cleanup):
    """--pid-file: a PID file that is missing, then holds garbage, then names the service."""
    receiver.clear()
    pid_file = tmp_path / "service.pid"
    agent = Agent(tmp_path, "--pid-file", str(pid_file), "--endpoint", rotel.endpoint("http/protobuf"))
    agent_cleanup(agent)
    agent.wait_log(f"waiting for the PID file {pid_file}")
    pid_file.write_text("not a pid\n")
    agent.wait_log("holds no PID ('not a pid')")
    ticker = subprocess.Popen([str(programs["ticker"]), str(tmp_path / "manifest.json"), "60s"])
    try:
        pid_file.write_text(f"{ticker.pid}\n")
        agent.wait_log(f"tracing PID {ticker.pid}")
        spans = receiver.wait_for(lambda got: any(s.name == "main.tick" for s in got), 15)
        assert any(s.name == "main.tick" and s.resource["process.pid"] == ticker.pid for s in spans)
    finally:
        ticker.terminate()
        ticker.wait(10)
    agent.wait_log(f"PID {ticker.pid} ({os.path.realpath(programs['ticker'])}) exited")  # .cache may be a link
    agent.stop(timeout=30)
    assert agent.proc.returncode == 0
    assert "Traceback" not in agent.log()


def test_watch_inside_the_pods_pid_namespace(tmp_path, agent_cleanup):
    """The agent in a PID namespace that is not the kernel's own, shared with the service (a pod
    with shareProcessNamespace): the agent is PID 1 there, the service joins later (nsenter, as a
    container of the pod), and both know it by that namespace's PID, the kernel by another. A
    goroutine created after the attach and still blocked when the agent stops must be found in
    the kernel's map under the PID the agent knows: it gets its span, flagged as a leak."""
    import urllib.request
    from helpers import build_program
    if not shutil.which("unshare") or not shutil.which("nsenter"):
        pytest.skip("unshare/nsenter (util-linux) missing")
    binary = tmp_path / f"svc-{secrets.token_hex(4)}"
    shutil.copy(build_program("service"), binary)
    log_path = tmp_path / "agent.log"
    log = open(log_path, "w")
    agent = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--", *AGENT, "watch", "-q", "--exe-name", binary.name,
                              "--scan-interval", "0.2", "--leak-after", "0.5", "--metrics-interval", "0",
                              "--exporter", "file", "--output", str(tmp_path / "spans.jsonl")], stdout=log, stderr=subprocess.STDOUT)
    service = None
    try:
        deadline = time.monotonic() + 10
        while not Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        agent_pid = int(Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()[0])  # PID 1 inside
        deadline = time.monotonic() + 20
        while "watching for" not in log_path.read_text():
            assert time.monotonic() < deadline and agent.poll() is None, log_path.read_text()
            time.sleep(0.1)
        ready = tmp_path / "ready"
        service = subprocess.Popen(["nsenter", f"--target={agent_pid}", "--pid", "--mount", "--",
                                    str(binary), str(ready), str(tmp_path / "manifest.json")])
        deadline = time.monotonic() + 30
        while "tracing PID" not in log_path.read_text() or not ready.exists() or not ready.read_text().strip():
            assert time.monotonic() < deadline and agent.poll() is None, log_path.read_text()
            time.sleep(0.1)
        ns_pid = int(log_path.read_text().split("tracing PID ")[1].split()[0])
        port = int(ready.read_text())
        for path in ("/leak", "/work?id=1"):
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10).read()
        time.sleep(1.5)  # past --leak-after
        os.kill(agent_pid, signal.SIGTERM)
        assert agent.wait(30) == 0, log_path.read_text()
    finally:
        for proc in (agent, service):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        log.close()
    text = log_path.read_text()
    assert "Traceback" not in text, text
    spans = spans_from_otlp_json(tmp_path / f"spans.{ns_pid}.jsonl")
    assert {s.resource["process.pid"] for s in spans} == {ns_pid} and ns_pid != service.pid  # not the kernel's PID
    goids = [s.attributes["go.goroutine.id"] for s in spans if not s.attributes.get("go.goroutine.partial")]
    assert len(goids) == len(set(goids)), "a goroutine exported twice (under two PIDs)"
    leaky = [s for s in spans if s.name == "main.leaky"]
    assert leaky, f"the goroutine blocked at the stop has no span; log:\n{text}"
    assert any(s.attributes.get("go.goroutine.leak_suspected") for s in leaky)
    assert leaky[-1].attributes["go.goroutine.end_reason"] == "agent_stopped"
    fetches = [s for s in spans if s.name == "main.fetch"]
    assert len(fetches) == 5
    by_span = {(s.trace_id, s.span_id): s for s in spans}
    for fetch in fetches:  # the request's tree: each fetch under the handler's goroutine
        assert by_span[(fetch.trace_id, fetch.parent_span_id)].name == "net/http.(*conn).serve"


def test_watch_follows_an_exec(programs, tmp_path, agent_cleanup):
    """A traced Go process that execs another Go program keeps its PID but loses its probes: the
    agent ends that tracing and traces the new program as a new process."""
    from helpers import build_program
    prefix = unique_name()
    launcher, service = tmp_path / f"{prefix}-launcher", tmp_path / f"{prefix}-service"
    shutil.copy(build_program("execer"), launcher)
    shutil.copy(programs["ticker"], service)
    agent = Agent(tmp_path, "--exe-name", f"{prefix}-*", "--exporter", "file", "--output", str(tmp_path / "spans.jsonl"),
                  "--metrics-interval", "0")
    agent_cleanup(agent)
    agent.wait_log("watching for")
    # The launcher execs the service on SIGUSR1, once traced; the service runs until SIGTERM.
    proc = subprocess.Popen([str(launcher), "120s", str(service), str(tmp_path / "manifest.json"), "120s"])
    spans_file = tmp_path / f"spans.{proc.pid}.jsonl"
    try:
        agent.wait_log(f"tracing PID {proc.pid} ({launcher}", timeout=60)
        proc.send_signal(signal.SIGUSR1)
        # The exec ends the first tracing (its other threads exit: the kernel's exit event), or
        # the next scan sees another executable under that PID ("now runs").
        log = agent.wait_log(f"tracing PID {proc.pid} ({service}", timeout=60)
        assert f"PID {proc.pid} ({launcher}) exited" in log or f"PID {proc.pid} ({launcher}) now runs {service}" in log
        assert poll(lambda: spans_file.exists() and spans_file.read_text().count('"name":"main.tick"') >= 50, 60), agent.log()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        agent.wait_log(f"PID {proc.pid} ({service}) exited")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    agent.stop(timeout=30)
    assert "Traceback" not in agent.log()
    spans = spans_from_otlp_json(spans_file)  # the second session's file replaced the first's
    assert {s.resource["process.executable.path"] for s in spans} == {str(service)}
    missed, spawned = ticks_untraced_after_attach(json.loads((tmp_path / "manifest.json").read_text()), spans)
    assert spawned >= 49 and not missed


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


def test_watch_traces_twenty_processes_that_start_at_once(programs, tmp_path, agent_cleanup):
    """Twenty Go processes of one binary start together under one agent, each for 3 s: the agent,
    its BPF program loaded once, attaches to each in a few tens of milliseconds (uprobes on the
    loaded program, a row of its config map; the binary analysed once), so every one is traced
    from early in its life to its end: every tick it spawned after the attach has its span, in
    that process's own span file (records routed by tgid: goids repeat across the processes).
    Reports the agent's RSS and the attach time of each process."""
    import re
    import statistics
    name = unique_name()
    binary = tmp_path / name
    shutil.copy(programs["ticker"], binary)
    agent = Agent(tmp_path, "--exe-name", name, "--exporter", "file", "--output", str(tmp_path / "spans.jsonl"),
                  "--metrics-interval", "0")
    agent_cleanup(agent)
    agent.wait_log(f"watching for executable name '{name}'")
    rss_before = _rss_mb(agent.proc.pid)
    procs = [subprocess.Popen([str(binary), str(tmp_path / f"manifest{n}.json"), "3s"]) for n in range(20)]
    try:
        assert all(p.wait(60) == 0 for p in procs)
        assert poll(lambda: all(f"PID {p.pid} ({binary}) exited" in agent.log() for p in procs), 60), agent.log()
        rss_after = _rss_mb(agent.proc.pid)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    agent.stop(timeout=60)
    log = agent.log()
    assert agent.proc.returncode == 0 and "Traceback" not in log, log
    attach_ms = {int(pid): float(ms) for pid, ms in re.findall(r"tracing PID (\d+) \(.*?\); attached in ([\d.]+) ms", log)}
    assert set(attach_ms) == {p.pid for p in procs}, log
    print(f"\nagent RSS {rss_before:.1f} MB before, {rss_after:.1f} MB with 20 processes traced "
          f"({(rss_after - rss_before) / 20:.2f} MB a process); per-process attach: median "
          f"{statistics.median(attach_ms.values()):.1f} ms, max {max(attach_ms.values()):.1f} ms")
    assert rss_after - rss_before < 20 * 5, "the agent grew more than 5 MB a process"
    for n, p in enumerate(procs):
        manifest = json.loads((tmp_path / f"manifest{n}.json").read_text())
        spans = spans_from_otlp_json(tmp_path / f"spans.{p.pid}.jsonl")
        assert {s.resource["process.pid"] for s in spans} == {p.pid}
        goids = [s.attributes["go.goroutine.id"] for s in spans if "go.goroutine.id" in s.attributes]  # not group spans
        assert len(goids) == len(set(goids)), f"PID {p.pid}: a goroutine exported twice (another process's?)"
        ticks = {g["goid"]: g for g in manifest["goroutines"] if g["func"] == "main.tick"}
        traced = {s.attributes["go.goroutine.id"] for s in spans if s.name == "main.tick"}
        assert traced <= set(ticks), f"PID {p.pid}: tick spans of goroutines it did not start"
        # Traced from the attach on: the dispatcher's span starts there if it already ran then.
        (dispatcher,) = [s for s in spans if s.name == "main.dispatcher"]
        attached_ns = dispatcher.start_ns if dispatcher.attributes.get("go.goroutine.existed_at_attach") else 0
        after = {goid for goid, g in ticks.items() if g["spawned"] >= attached_ns}
        assert not after - traced, f"PID {p.pid}: {len(after - traced)} of the {len(after)} ticks after the attach untraced"
        # Attached early in its 3 s: most of its ~300 ticks came after (before the shared program,
        # compiling per process left most of the twenty untraced until they had ended).
        assert len(after) >= len(ticks) // 2, f"PID {p.pid}: only {len(after)} of {len(ticks)} ticks after the attach"
