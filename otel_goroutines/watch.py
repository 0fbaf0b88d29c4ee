"""`otel-goroutines watch`: find the Go processes a selector names, trace each from when it is
seen until it exits, several at once in one agent process, and keep looking for new ones.

Discovery reads /proc: it sees what the agent's PID namespace sees (a sidecar with
shareProcessNamespace sees its pod). A process is told apart from a later one that reuses its
PID by its start time, and from its own earlier self (a shell that execs the service) by the
inode of its executable, which is read through /proc/PID/exe, so it works across mount
namespaces.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass

from . import goruntime
from .agent import AgentOptions, Session
from .analysis import AnalysisCache
from .binary.gobinary import GoBinary
from .errors import AgentError, UnsupportedTarget
from .probes import BpfProgram
from .target import AttachedTarget

log = logging.getLogger("otel_goroutines.watch")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass(frozen=True)
class Selector:
    """Which processes to trace: any process matching one of the given criteria (all Go processes
    when none is given), less any process an exclusion names. Names and paths are shell patterns
    (`my-*`)."""
    exe_names: tuple[str, ...] = ()
    exe_paths: tuple[str, ...] = ()
    pid_file: str | None = None
    exclude_names: tuple[str, ...] = ()
    exclude_paths: tuple[str, ...] = ()

    @property
    def everything(self) -> bool:
        return not (self.exe_names or self.exe_paths or self.pid_file)

    def describe(self) -> str:
        if self.everything:
            text = "every Go process"
        else:
            parts = _describe_patterns(self.exe_names, self.exe_paths)
            if self.pid_file:
                parts.append(f"the PID in {self.pid_file}")
            text = " or ".join(parts)
        excluded = _describe_patterns(self.exclude_names, self.exclude_paths)
        return f"{text}, except {' or '.join(excluded)}" if excluded else text

    def includes(self, proc: "Process", pid_from_file: int | None) -> bool:
        return self.everything or proc.pid == pid_from_file or \
            _first_match(proc.exe, self.exe_names, self.exe_paths) is not None

    def excluded_by(self, proc: "Process") -> str | None:
        """The exclusion that names PROC (described), or None. An exclusion wins over every criterion."""
        return _first_match(proc.exe, self.exclude_names, self.exclude_paths)


def _describe_patterns(names: tuple[str, ...], paths: tuple[str, ...]) -> list[str]:
    return [f"executable name {n!r}" for n in names] + [f"executable path {p!r}" for p in paths]


def _first_match(exe: str, names: tuple[str, ...], paths: tuple[str, ...]) -> str | None:
    name = os.path.basename(exe)
    return next((f"executable name {n!r}" for n in names if fnmatch.fnmatchcase(name, n)), None) or \
        next((f"executable path {p!r}" for p in paths if fnmatch.fnmatchcase(exe, p)), None)


@dataclass(frozen=True)
class Process:
    pid: int
    start_time: int          # /proc/PID/stat field 22: tells a reused PID apart
    exe: str                 # the executable's path in the process's own mount namespace
    inode: tuple[int, int]   # (st_dev, st_ino) of the executable: changes when the process execs

    @property
    def key(self) -> tuple:
        return (self.pid, self.start_time, self.inode)


def read_process(pid: int, proc_root: str = "/proc") -> Process | None:
    """What /proc says about PID, or None for a process that is gone, a kernel thread or a
    zombie. PermissionError when this agent may not read its executable (no CAP_SYS_PTRACE)."""
    try:
        with open(f"{proc_root}/{pid}/stat", "rb") as f:
            stat = f.read()
        start_time = int(stat[stat.rindex(b")") + 2:].split()[19])
        exe = os.readlink(f"{proc_root}/{pid}/exe")
        st = os.stat(f"{proc_root}/{pid}/exe")
    except PermissionError:
        raise
    except (OSError, ValueError, IndexError):
        return None
    if exe.endswith(" (deleted)"):  # replaced on disk while running; the running copy is still there
        exe = exe[: -len(" (deleted)")]
    return Process(pid, start_time, exe, (st.st_dev, st.st_ino))


def list_pids(proc_root: str = "/proc") -> list[int]:
    try:
        return sorted(int(name) for name in os.listdir(proc_root) if name.isdigit())
    except OSError:
        return []


def go_version_of(pid: int) -> str:
    """The Go version of PID's executable; UnsupportedTarget (with the reason) if it is not Go."""
    binary = GoBinary(f"/proc/{pid}/exe")
    try:
        goruntime.require_traceable(binary)
        return binary.go_version
    finally:
        binary.close()


class HealthFile:
    """A small JSON file rewritten at least every few seconds while the agent is alive, for an
    orchestrator's exec probe (`otel-goroutines health --file PATH`). Removed on exit."""

    def __init__(self, path: str):
        self.path = path
        self._error: str | None = None
        directory = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise AgentError(f"cannot create the directory of --health-file {path}: {exc.strerror}") from None

    def write(self, state: dict) -> None:
        tmp = f"{self.path}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(state, f)
            os.replace(tmp, self.path)
            self._error = None
        except OSError as exc:
            if exc.strerror != self._error:  # once per kind of failure, not at every scan
                log.warning("cannot write the health file %s: %s", self.path, exc.strerror)
            self._error = exc.strerror

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass


def check_health(path: str, max_age_s: float, require_target: bool) -> str | None:
    """None if the health file says the agent is alive (and attached, if required); else why not."""
    try:
        with open(path) as f:
            state = json.load(f)
        age = time.time() - float(state["updated"])
        targets = state["targets"]
    except FileNotFoundError:
        return f"no health file {path}: the agent is not running (or has no --health-file)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable health file {path}: {exc}"
    if age > max_age_s:
        return f"the agent's last heartbeat is {age:.0f} s old (more than {max_age_s:g} s): it is stuck or gone"
    if state.get("state") != "running":
        return f"the agent is {state.get('state')}"
    if require_target and not targets:
        return f"the agent runs but traces no process yet (looking for {state.get('selector')})"
    return None


@dataclass
class Traced:
    process: Process
    target: AttachedTarget
    session: Session
    steps: object  # the session's generator
    replaced: bool = False  # the process exec'd another program


class Watcher:
    """Runs one Session per matching process, all in this process's one loop, on one BPF program
    (compiled once, at the start): a new process costs its uprobes and a row in the program's maps."""

    def __init__(self, selector: Selector, options: AgentOptions, scan_interval_s: float = 1.0,
                 health_file: str | None = None, shutdown_timeout_s: float = 20.0, poll_ms: int = 20):
        self.selector = selector
        self.options = options
        self.scan_interval_s = scan_interval_s
        self.health = HealthFile(health_file) if health_file else None
        self.shutdown_timeout_s = shutdown_timeout_s
        self.poll_ms = poll_ms
        self.traced: dict[int, Traced] = {}
        self.decided: dict[int, tuple] = {}    # PID -> key of the process last judged there (not traced)
        self.counts: Counter = Counter()       # traced, ended, excluded, skipped_not_go, skipped_unsupported, failed
        self._stopping = False
        self._pid_file_note: str | None = None
        self._own_pids = {os.getpid()}
        self.program = BpfProgram(options.probes)
        self.analyses = AnalysisCache()

    # --- discovery ------------------------------------------------------------------------
    def _pid_from_file(self) -> int | None:
        if not self.selector.pid_file:
            return None
        note = None
        pid = None
        try:
            with open(self.selector.pid_file) as f:
                text = f.read().strip()
            pid = int(text)
            if pid <= 0:
                raise ValueError
        except FileNotFoundError:
            note, level = f"waiting for the PID file {self.selector.pid_file}", logging.INFO
        except OSError as exc:
            note, level = f"cannot read the PID file {self.selector.pid_file}: {exc.strerror}", logging.WARNING
        except ValueError:
            note, level = f"the PID file {self.selector.pid_file} holds no PID ({text[:40]!r})", logging.WARNING
            pid = None
        if note and note != self._pid_file_note:  # say it once per change, not every scan
            log.log(level, "%s", note)
            if level == logging.WARNING:
                self.counts["bad_pid_file"] += 1
        self._pid_file_note = note
        return pid

    def scan(self) -> None:
        pid_from_file = self._pid_from_file()
        for pid, t in self.traced.items():  # a traced process that exec'd another program: its probes are gone
            try:
                now = read_process(pid)
            except PermissionError:
                continue
            if now is not None and now.key != t.process.key and not t.replaced:
                t.replaced = True
                log.info("PID %d (%s) now runs %s: its tracing ends, and starts again if that matches", pid, t.process.exe, now.exe)
                t.session.stop()
        for pid in list_pids():
            if pid in self.traced or pid in self._own_pids:
                continue
            try:
                proc = read_process(pid)
            except PermissionError:
                self._denied(pid)
                continue
            if proc is None or self.decided.get(pid) == proc.key or not self.selector.includes(proc, pid_from_file):
                continue
            self.decided[pid] = proc.key  # judged once: a PID is looked at again only as another process
            if (exclusion := self.selector.excluded_by(proc)) is not None:
                self.counts["excluded"] += 1
                log.info("not tracing PID %d (%s): excluded by %s", pid, proc.exe, exclusion)
                continue
            self._consider(proc)
        alive = set(list_pids())
        for pid in [p for p in self.decided if p not in alive]:
            del self.decided[pid]

    def _consider(self, proc: Process) -> None:
        try:
            go_version = go_version_of(proc.pid)
        except (UnsupportedTarget, OSError) as exc:
            self.counts["skipped_not_go"] += 1
            # Every non-Go process of the host is no news in `watch` with no selector.
            log.log(logging.DEBUG if self.selector.everything else logging.WARNING,
                    "skipping PID %d (%s): %s", proc.pid, proc.exe, _reason(exc, proc.pid))
            return
        try:
            target = AttachedTarget.from_pid(proc.pid)
        except AgentError as exc:
            log.info("PID %d (%s) is gone before it could be traced: %s", proc.pid, proc.exe, exc)
            return
        export = self.options.export
        if export.output and export.exporter in ("file", "console"):  # one file per process: spans.jsonl -> spans.PID.jsonl
            root, ext = os.path.splitext(export.output)
            export = dataclasses.replace(export, output=f"{root}.{proc.pid}{ext}")
        options = dataclasses.replace(self.options, export=export, quiet=True, poll_interval_ms=self.poll_ms)
        started = time.monotonic()
        try:
            session = Session(target, options, self.program, self.analyses)
            steps = session.steps(handle_signals=False)
            next(steps)  # attaches the probes, reads the goroutines alive now
        except UnsupportedTarget as exc:
            target.close()
            self.counts["skipped_unsupported"] += 1
            log.warning("skipping PID %d (%s, %s): %s", proc.pid, proc.exe, go_version, _reason(exc, proc.pid))
            return
        except Exception as exc:  # AgentError, or a bug: one line, and the other targets go on
            target.close()
            log.debug("could not trace PID %d", proc.pid, exc_info=True)
            if not os.path.exists(f"/proc/{proc.pid}"):
                log.info("PID %d (%s) exited while the probes were being attached", proc.pid, proc.exe)
                return
            self.counts["failed"] += 1
            log.warning("could not trace PID %d (%s): %s", proc.pid, proc.exe,
                        exc if isinstance(exc, AgentError) else f"{type(exc).__name__}: {exc}")
            return
        self.traced[proc.pid] = Traced(proc, target, session, steps)
        self.counts["traced"] += 1
        log.info("tracing PID %d (%s, %s); attached in %.1f ms", proc.pid, proc.exe, go_version, (time.monotonic() - started) * 1e3)

    def _denied(self, pid: int) -> None:
        if self.decided.get(pid) == "denied":
            return
        self.decided[pid] = "denied"
        self.counts["not_inspectable"] += 1
        if not _has_capability(_CAP_SYS_PTRACE):
            if self.counts["not_inspectable"] == 1:  # once: the cause is the agent's privileges, not the process
                log.warning("cannot read /proc/%d/exe (permission denied): processes of other users or with more "
                            "capabilities are invisible to this agent; give it CAP_SYS_PTRACE", pid)
        else:  # a process even CAP_SYS_PTRACE may not inspect (an LSM, a sandbox's init)
            log.info("cannot read /proc/%d/exe (permission denied); it is not traced", pid)

    # --- the loop ---------------------------------------------------------------------------
    def _step(self, pid: int) -> None:
        t = self.traced[pid]
        try:
            next(t.steps)
            return
        except StopIteration:
            self.counts["ended"] += 1
            log.info("PID %d (%s) %s; its goroutine spans are flushed", pid, t.process.exe,
                     "no longer traced" if self._stopping else "exited")
        except Exception as exc:  # one target's failure must not end the others' tracing
            self.counts["failed"] += 1
            log.warning("tracing PID %d (%s) failed: %s: %s", pid, t.process.exe, type(exc).__name__, exc)
            log.debug("tracing PID %d failed", pid, exc_info=True)
            t.steps.close()
        del self.traced[pid]
        t.target.close()
        self._write_health()

    def _on_signal(self, signum, _frame) -> None:
        if self._stopping:  # a second signal: stop flushing, go now
            raise KeyboardInterrupt
        log.info("got %s: stopping (flushing for at most %g s)", signal.Signals(signum).name, self.shutdown_timeout_s)
        self._stopping = True

    def _write_health(self) -> None:
        if self.health is None:
            return
        self.health.write({
            "pid": os.getpid(),
            "updated": time.time(),
            "state": "stopping" if self._stopping else "running",
            "selector": self.selector.describe(),
            "targets": [{"pid": pid, "exe": t.process.exe} for pid, t in sorted(self.traced.items())],
            "counts": dict(self.counts),
        })

    def run(self) -> int:
        self.program.load()  # a program the kernel refuses fails the agent now, in one line
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        log.info("watching for %s (every %g s)", self.selector.describe(), self.scan_interval_s)
        try:
            next_scan = 0.0
            while not self._stopping:
                now = time.monotonic()
                if now >= next_scan:
                    self.scan()
                    self._write_health()
                    next_scan = now + self.scan_interval_s
                if not self.traced:
                    time.sleep(min(max(0.0, next_scan - time.monotonic()), 0.2))
                for pid in list(self.traced):
                    if self._stopping:
                        break
                    self._step(pid)
            self._shutdown()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            for t in self.traced.values():  # only after an abort (a second signal): detach, no flush
                t.steps.close()
                t.target.close()
            if self.health is not None:
                self.health.remove()
            self.program.close()
        log.info("stopped: %s", ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())) or "nothing traced")
        return 0

    def _shutdown(self) -> None:
        """Stop every session and flush its spans, all within shutdown_timeout_s."""
        self._write_health()
        deadline = time.monotonic() + self.shutdown_timeout_s
        for pid in list(self.traced):
            self.traced[pid].session.stop(flush_share(deadline - time.monotonic(), len(self.traced)))
            while pid in self.traced:
                self._step(pid)


def flush_share(remaining_s: float, sessions_left: int) -> float:
    """The flush timeout of the next session to stop: an equal part of what is left of the shutdown
    timeout, less about a second to detach (at least 0.2 s: a session always gets a chance to flush)."""
    return max(0.2, remaining_s / sessions_left - 1.0)


_CAP_SYS_PTRACE = 19


def _has_capability(cap: int) -> bool:
    try:
        with open("/proc/self/status") as status:
            return bool(int(next(l.split()[1] for l in status if l.startswith("CapEff:")), 16) >> cap & 1)
    except (OSError, StopIteration, ValueError):
        return True


def _reason(exc: Exception, pid: int) -> str:
    # The binary was opened as /proc/PID/exe; the message reads better without that path.
    return str(exc).replace(f"/proc/{pid}/exe ", "it ").replace(f"/proc/{pid}/exe", "it")
