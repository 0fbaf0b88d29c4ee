"""Shared test machinery: building Go fixture programs, a real OTLP pipeline, running the agent."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ROOT / "tests" / "programs"
CACHE = ROOT / ".cache" / "test-binaries"
AGENT = [str(ROOT / ".venv" / "bin" / "otel-goroutines")] if (ROOT / ".venv" / "bin" / "otel-goroutines").exists() \
    else [sys.executable, "-m", "otel_goroutines"]


def go_toolchain() -> str:
    return subprocess.run([str(ROOT / "scripts" / "go-toolchain.sh")], check=True, capture_output=True, text=True).stdout.strip()


def go_release(minor: str) -> str:
    """The `go` command of Go MINOR ("1.26"), from scripts/go_toolchains.py (installed once, cached):
    raises, never returns None, when it cannot be had."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import go_toolchains
    return str(go_toolchains.toolchain(minor))


def build_program(name: str, go: str | None = None, flags: tuple[str, ...] = (), cgo: bool = False,
                  goarch: str = "amd64", goexperiment: str = "") -> Path:
    """Build tests/programs/NAME once per (its source, toolchain, flags, cgo, GOARCH, GOEXPERIMENT); later runs reuse the binary."""
    go = go or go_toolchain()
    digest = hashlib.sha256()
    sources = [*PROGRAMS.glob("go.*"), *(PROGRAMS / name).rglob("*"), *(PROGRAMS / "internal").rglob("*")]
    for path in sorted(sources):
        if path.is_file():
            digest.update(path.relative_to(PROGRAMS).as_posix().encode() + path.read_bytes())
    digest.update(go.encode() + "\0".join(flags).encode() + (b"\0cgo" if cgo else b""))
    if goarch != "amd64":
        digest.update(b"\0GOARCH=" + goarch.encode())
    if goexperiment:
        digest.update(b"\0GOEXPERIMENT=" + goexperiment.encode())
    out = CACHE / f"{name}-{digest.hexdigest()[:16]}"
    if not out.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, GOTOOLCHAIN="local", GOFLAGS="-mod=mod", CGO_ENABLED="1" if cgo else "0", GOARCH=goarch)
        if goexperiment:
            env["GOEXPERIMENT"] = goexperiment
        tmp = out.with_suffix(".tmp")
        subprocess.run([go, "build", *flags, "-o", str(tmp), f"./{name}"], cwd=PROGRAMS, env=env, check=True)
        tmp.rename(out)
    return out


def site_line(program: str, marker: str) -> int:
    """Line of the `go` statement tagged `// site:MARKER` in tests/programs/PROGRAM/main.go."""
    for number, line in enumerate((PROGRAMS / program / "main.go").read_text().splitlines(), 1):
        if line.rstrip().endswith(f"// site:{marker}"):
            return number
    raise KeyError(marker)


def parsed_options(*args: str):
    """The AgentOptions `otel-goroutines run ARGS -- prog` would run with: for tests that drive a Session in-process."""
    from otel_goroutines import cli
    params = cli.run.make_context("run", [*args, "--", "prog"]).params
    return cli._options(**{k: v for k, v in params.items() if k != "program"})


def bench_module():
    """bench/run.py as a module: its held, pinned churn runs, agent process and report."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import run as bench_run
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return bench_run


def poll(predicate, timeout: float, every: float = 0.1) -> bool:
    """Whether PREDICATE() became true within TIMEOUT seconds: for a fact to wait for, with a
    deadline generous enough for a loaded machine, instead of a sleep that assumes a schedule."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    start_ns: int
    end_ns: int
    attributes: dict
    events: list[tuple[str, int, dict]]
    resource: dict
    links: list[tuple[str, str, dict]] = field(default_factory=list)
    status_code: int = 0


def _value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def _attrs(kvs) -> dict:
    return {kv.key: _value(kv.value) for kv in kvs}


def spans_from_request(req: ExportTraceServiceRequest) -> list[Span]:
    out = []
    for rs in req.resource_spans:
        resource = _attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(Span(s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name,
                                s.start_time_unix_nano, s.end_time_unix_nano, _attrs(s.attributes),
                                [(e.name, e.time_unix_nano, _attrs(e.attributes)) for e in s.events], resource,
                                [(link.trace_id.hex(), link.span_id.hex(), _attrs(link.attributes)) for link in s.links],
                                s.status.code))
    return out


def spans_from_otlp_json(path: Path) -> list[Span]:
    from google.protobuf.json_format import ParseDict
    import base64
    out = []
    for line in path.read_text().splitlines():
        message = json.loads(line)
        for rs in message.get("resourceSpans", ()):  # OTLP/JSON ids are hex; protobuf JSON wants base64
            for ss in rs.get("scopeSpans", ()):
                for s in ss.get("spans", ()):
                    for item in (s, *s.get("links", ())):
                        for key in ("traceId", "spanId", "parentSpanId"):
                            if key in item:
                                item[key] = base64.b64encode(bytes.fromhex(item[key])).decode()
        out += spans_from_request(ParseDict(message, ExportTraceServiceRequest()))
    return out


class OtlpHttpReceiver:
    """A minimal OTLP/HTTP protobuf trace receiver: what the real collector forwards to.
    With keep_spans=False it only counts them (for the benchmark's hundreds of thousands).
    trace_requests: (path, headers with lower-case names, the test.run.id markers of its spans) of
    each trace export received."""

    def __init__(self, keep_spans: bool = True):
        self.spans: list[Span] = []
        self.trace_requests: list[tuple[str, dict[str, str]]] = []
        self.span_count = 0
        self.metrics: list[ExportMetricsServiceRequest] = []
        self.requests = 0
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path.endswith("/v1/traces"):
                    req = ExportTraceServiceRequest()
                    req.ParseFromString(body)
                    with lock:
                        receiver.span_count += sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
                        if keep_spans:
                            spans = spans_from_request(req)
                            receiver.spans += spans
                            receiver.trace_requests.append((self.path, {k.lower(): v for k, v in self.headers.items()},
                                                            {s.resource.get("test.run.id") for s in spans} - {None}))
                        receiver.requests += 1
                elif self.path.endswith("/v1/metrics"):
                    req = ExportMetricsServiceRequest()
                    req.ParseFromString(body)
                    with lock:
                        receiver.metrics.append(req)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def wait_for(self, predicate, timeout: float = 15.0) -> list[Span]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.spans):
                return list(self.spans)
            time.sleep(0.1)
        return list(self.spans)

    def wait_for_count(self, n: int, timeout: float) -> int:
        """Wait until n spans arrived in all, or nothing more arrives for 2 s, or timeout."""
        deadline = time.monotonic() + timeout
        last, last_change = self.span_count, time.monotonic()
        while time.monotonic() < deadline and self.span_count < n:
            time.sleep(0.05)
            if self.span_count != last:
                last, last_change = self.span_count, time.monotonic()
            elif time.monotonic() - last_change > 2.0:
                break
        return self.span_count

    def clear(self) -> None:
        self.spans = []
        self.metrics = []
        self.trace_requests = []

    def metric_points(self, name: str) -> list:
        """Data points of the newest export that carries metric NAME."""
        for req in reversed(self.metrics):
            for rm in req.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        if m.name == name:
                            return list(getattr(m, m.WhichOneof("data")).data_points)
        return []

    def close(self) -> None:
        self._server.shutdown()


class Rotel:
    """The real third-party collector (rotel, from PyPI) receiving OTLP gRPC and HTTP and
    forwarding everything to an OtlpHttpReceiver."""

    def __init__(self, forward_port: int, log_path: Path, ports: tuple[int, int] | None = None):
        """PORTS: (gRPC, HTTP) to listen on, for a collector started where an agent already sends."""
        import rotel
        binary = Path(rotel.__file__).parent / "rotel-agent"
        self.grpc_port, self.http_port = ports or (free_port(), free_port())
        self._log = open(log_path, "w")
        self._proc = subprocess.Popen(
            [str(binary), "start", "--otlp-grpc-endpoint", f"127.0.0.1:{self.grpc_port}",
             "--otlp-http-endpoint", f"127.0.0.1:{self.http_port}", "--exporter", "otlp",
             "--otlp-exporter-endpoint", f"http://127.0.0.1:{forward_port}", "--otlp-exporter-protocol", "http",
             "--batch-timeout", "100ms"],
            stdout=self._log, stderr=subprocess.STDOUT)
        wait_for_port(self.grpc_port)
        wait_for_port(self.http_port)

    def endpoint(self, protocol: str) -> str:
        return f"http://127.0.0.1:{self.grpc_port if protocol == 'grpc' else self.http_port}"

    def close(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._log.close()


@dataclass
class AgentRun:
    returncode: int
    stdout: str
    stderr: str


def run_agent(args: list[str], timeout: float = 60.0, env: dict | None = None) -> AgentRun:
    proc = subprocess.run(AGENT + args, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))
    return AgentRun(proc.returncode, proc.stdout, proc.stderr)


def attach_to_ticker(ticker: Path, tmp_path: Path, agent_args: list[str], app_env: dict, until,
                     agent_env: dict | None = None) -> tuple[int, str]:
    """tests/programs/ticker started with app_env added to this environment, the agent attached with
    agent_args and agent_env (this environment without its OTEL_ variables, then agent_env) until
    until() holds (or 60 s), then stopped with SIGINT: (the ticker's PID, the agent's stderr)."""
    ticker_proc = subprocess.Popen([str(ticker), str(tmp_path / "ticker.json"), "60s"], env=dict(os.environ, **app_env))
    env = dict({k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}, **(agent_env or {}))
    agent = subprocess.Popen(AGENT + ["attach", "-q", *agent_args, str(ticker_proc.pid)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        poll(lambda: until() or agent.poll() is not None, 60, every=0.3)
        agent.send_signal(signal.SIGINT)
        _, err = agent.communicate(timeout=30)
        assert agent.returncode == 0, err
    finally:
        ticker_proc.send_signal(signal.SIGTERM)
        ticker_proc.wait(10)
        if agent.poll() is None:
            agent.kill()
    return ticker_proc.pid, err


def run_marker(env: dict | None = None) -> tuple[str, dict]:
    """A marker for one agent run's spans and the environment that sets it (test.run.id, a resource
    attribute, added to any OTEL_RESOURCE_ATTRIBUTES in ENV). Goroutine ids repeat from one run of
    a fixture to the next, and a collector may deliver an earlier run's spans after
    receiver.clear(): a test reads only the spans of_run(spans, marker)."""
    marker = secrets.token_hex(6)
    env = dict(env or {})
    env["OTEL_RESOURCE_ATTRIBUTES"] = ",".join(filter(None, (env.get("OTEL_RESOURCE_ATTRIBUTES"), f"test.run.id={marker}")))
    return marker, env


def of_run(spans: list[Span], marker: str) -> list[Span]:
    return [s for s in spans if s.resource.get("test.run.id") == marker]


def group_spans(spans: list[Span]) -> dict[tuple[str, str], Span]:
    """The spans of groups of short goroutines (--group-window), by (trace id, span id): they have no goroutine id."""
    return {(s.trace_id, s.span_id): s for s in spans if "go.goroutine.group.goroutines" in s.attributes}


def goroutine_spans(spans: list[Span]) -> list[Span]:
    return [s for s in spans if "go.goroutine.group.goroutines" not in s.attributes]


def creator_links(span: Span) -> list[tuple[str, str, dict]]:
    """A span's links to its creator (not those to its wakers)."""
    return [link for link in span.links if link[2].get("go.goroutine.link") == "creator"]


def by_goid(spans: list[Span]) -> dict[int, Span]:
    """Goroutine spans by goroutine id (group spans, which have none, left out)."""
    out = {}
    for s in goroutine_spans(spans):
        goid = s.attributes["go.goroutine.id"]
        assert goid not in out, f"goroutine {goid} exported twice"
        out[goid] = s
    return out


def ticks_untraced_after_attach(manifest: dict, spans: list[Span]) -> tuple[set[int], int]:
    """The ticker's ticks spawned after the attach that have no span, and how many it spawned then.
    The attach time is the start of the dispatcher's span (it existed at the attach); a tick
    spawned before it may have ended before the goroutine list was read, untraced."""
    (dispatcher,) = [s for s in spans if s.name == "main.dispatcher"]
    assert dispatcher.attributes["go.goroutine.existed_at_attach"] is True
    after = {g["goid"] for g in manifest["goroutines"] if g["func"] == "main.tick" and g["spawned"] >= dispatcher.start_ns}
    return after - {s.attributes["go.goroutine.id"] for s in spans if s.name == "main.tick"}, len(after)


APPSERVICE = PROGRAMS / "appservice"  # its own Go module: go.mod pins the newest OpenTelemetry SDK, go.sdk-*.mod older ones
SDK_NEWEST = "v1.47.0"


def build_appservice(sdk: str = SDK_NEWEST, go: str | None = None, flags: tuple[str, ...] = (), goarch: str = "amd64",
                     package: str = ".") -> Path:
    """Build tests/programs/appservice (or PACKAGE of its module, e.g. "./spandepth") against one
    OpenTelemetry Go SDK release, once per (its sources, SDK release, toolchain, flags, GOARCH,
    package); its modules come from the Go module proxy."""
    go = go or go_toolchain()
    modfile = () if sdk == SDK_NEWEST else (f"-modfile=go.sdk-{sdk}.mod",)
    digest = hashlib.sha256()
    for path in sorted(p for p in APPSERVICE.rglob("*") if p.is_file()):
        digest.update(path.relative_to(APPSERVICE).as_posix().encode() + path.read_bytes())
    digest.update("\0".join((go, *modfile, *flags)).encode())
    if goarch != "amd64":
        digest.update(b"\0GOARCH=" + goarch.encode())
    if package != ".":
        digest.update(b"\0package=" + package.encode())
    out = CACHE / f"appservice-{digest.hexdigest()[:16]}"
    if not out.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, GOTOOLCHAIN="local", GOFLAGS="-mod=readonly", CGO_ENABLED="0", GOARCH=goarch)
        tmp = out.with_suffix(".tmp")
        subprocess.run([go, "build", *modfile, *flags, "-o", str(tmp), package], cwd=APPSERVICE, env=env, check=True)
        tmp.rename(out)
    return out


@contextlib.contextmanager
def tickers_on_one_program(ticker: Path, tmp_path: Path, settings):
    """Two ticker processes, each with its GoroutineProbes (not attached yet) on one BpfProgram of
    these ProbeSettings; probes and program closed, tickers killed after."""
    from otel_goroutines.analysis import analyse
    from otel_goroutines.probes import BpfProgram, GoroutineProbes

    tickers = [subprocess.Popen([str(ticker), str(tmp_path / f"t{n}.json"), "60s"]) for n in range(2)]
    program = BpfProgram(settings)
    found = analyse(str(ticker))
    probes = [GoroutineProbes(found.support, str(ticker), t.pid, settings, found.sdk.support, program) for t in tickers]
    try:
        yield probes
    finally:
        for p in probes:
            p.close()
        program.close()
        for t in tickers:
            t.kill()
            t.wait()
