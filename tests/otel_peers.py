"""Real OTLP peers built from the Go module proxy: an OpenTelemetry Collector assembled from its
modules (tests/peers/otelcol) and Jaeger v2 (a `tool` of tests/peers/go.mod). Both come from
one Go module, so they share one dependency graph and one compile of the collector's packages.

Binaries are cached under .cache/peers/<module>-<key>/, the key being a digest of the module's
files and the Go version: a second test run builds nothing."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from helpers import ROOT, free_port, go_toolchain, wait_for_port

PEERS_SRC = ROOT / "tests" / "peers"
PEERS_CACHE = ROOT / ".cache" / "peers"
COLLECTOR_CONFIGS = ROOT / "collector-config"
JAEGER_PACKAGE = "github.com/jaegertracing/jaeger/cmd/jaeger"


def _module_files(module: Path) -> list[Path]:
    """The files that decide what a Go module builds: go.mod, go.sum and its .go files, not
    those of modules nested in it (tests/peers/compose is one)."""
    nested = {p.parent for p in module.rglob("go.mod") if p.parent != module}
    return sorted(p for p in module.rglob("*") if p.is_file() and p.suffix in (".mod", ".sum", ".go")
                  and not any(n in p.parents for n in nested))


def build_go_module(module: Path, targets: dict[str, str]) -> dict[str, Path]:
    """Build each package of TARGETS (name -> package) in MODULE, once per module content and Go
    version: .cache/peers/<module>-<digest>/<name>. Build times land in build-times.json there."""
    go = go_toolchain()
    version = subprocess.run([go, "env", "GOVERSION"], env=dict(os.environ, GOTOOLCHAIN="local"),
                             check=True, capture_output=True, text=True).stdout.strip()
    digest = hashlib.sha256(version.encode())
    for path in _module_files(module):
        digest.update(path.relative_to(module).as_posix().encode() + b"\0" + path.read_bytes())
    out = PEERS_CACHE / f"{module.name}-{digest.hexdigest()[:16]}"
    binaries = {name: out / name for name in targets}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once build once
        times = {}
        env = dict(os.environ, GOTOOLCHAIN="local", GOFLAGS="-mod=mod", CGO_ENABLED="0")
        for name, package in targets.items():
            if binaries[name].exists():
                continue
            # Past pytest's capture: a first build of Jaeger is minutes of silence otherwise.
            print(f"\nbuilding test peer {name} ({package}) into {out}: once, minutes for Jaeger", file=sys.__stderr__, flush=True)
            started = time.monotonic()
            tmp = binaries[name].with_suffix(".tmp")
            result = subprocess.run([go, "build", "-trimpath", "-o", str(tmp), package], cwd=module, env=env,
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"building {name} in {module} failed:\n{result.stderr[-3000:]}")
            tmp.rename(binaries[name])
            times[name] = round(time.monotonic() - started, 1)
        if times:
            (out / "build-times.json").write_text(json.dumps(times))
            print(f"built {', '.join(times)} in {out}: {times} (seconds)", file=sys.__stderr__, flush=True)
    return binaries


def build_peers() -> dict[str, Path]:
    """The `otelcol` and `jaeger` binaries (Jaeger first: the collector then reuses its compiled packages)."""
    return build_go_module(PEERS_SRC, {"jaeger": JAEGER_PACKAGE, "otelcol": "./otelcol"})


def build_k8s_collector() -> Path:
    """otelcol-k8s: the collector with the contrib k8s_attributes processor (collector-config/otelcol-k8s.yaml)."""
    return build_go_module(PEERS_SRC / "otelcol-k8s", {"otelcol-k8s": "."})["otelcol-k8s"]


def build_compose_check() -> Path:
    """compose-check: `docker compose config` without Docker (compose-go, the loader Compose uses)."""
    return build_go_module(PEERS_SRC / "compose", {"compose-check": "."})["compose-check"]


def validate_config(otelcol: Path, config: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(otelcol), "validate", "--config", str(config)], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=60)


class Peer:
    def __init__(self, argv: list[str], env: dict, log_path: Path, ports: list[int]):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self._proc = subprocess.Popen(argv, env=dict(os.environ, **env), stdout=self._log, stderr=subprocess.STDOUT)
        try:
            for port in ports:
                wait_for_port(port, timeout=60)
        except TimeoutError:
            self.close()
            raise RuntimeError(f"{argv[0]} did not start:\n{log_path.read_text()[-3000:]}") from None

    def log(self) -> str:
        return self.log_path.read_text()

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()


class Collector(Peer):
    """The collector running one of collector-config/*.yaml, every endpoint on loopback."""

    def __init__(self, otelcol: Path, config: Path, log_path: Path, jaeger_grpc: int | None = None,
                 tempo_grpc: int | None = None):
        self.grpc_port, self.http_port = free_port(), free_port()
        env = {"OTLP_GRPC_ENDPOINT": f"127.0.0.1:{self.grpc_port}", "OTLP_HTTP_ENDPOINT": f"127.0.0.1:{self.http_port}",
               "JAEGER_OTLP_ENDPOINT": f"127.0.0.1:{jaeger_grpc or free_port()}",
               "TEMPO_OTLP_ENDPOINT": f"127.0.0.1:{tempo_grpc or free_port()}"}
        # The collector's own metrics would listen on :8888: off here, where several may run.
        super().__init__([str(otelcol), "--config", str(config), "--set", "service.telemetry.metrics.level=none"],
                         env, log_path, [self.grpc_port, self.http_port])

    def endpoint(self, protocol: str) -> str:
        return f"http://127.0.0.1:{self.grpc_port if protocol == 'grpc' else self.http_port}"


class Jaeger(Peer):
    """Jaeger v2 with memory storage: OTLP gRPC in, the HTTP query API (what its UI reads) out."""

    def __init__(self, jaeger: Path, log_path: Path):
        self.otlp_grpc, self.query_http = free_port(), free_port()
        env = {"JAEGER_OTLP_GRPC_PORT": str(self.otlp_grpc), "JAEGER_QUERY_HTTP_PORT": str(self.query_http),
               "JAEGER_QUERY_GRPC_PORT": str(free_port())}
        super().__init__([str(jaeger), "--config", str(PEERS_SRC / "jaeger.yaml")], env, log_path,
                         [self.otlp_grpc, self.query_http])

    def _get(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.query_http}{path}", timeout=10) as response:
            return json.load(response)

    def services(self) -> list[str]:
        return self._get("/api/services")["data"] or []

    def traces(self, service: str) -> list[dict]:
        return self._get(f"/api/traces?service={service}&limit=1000&lookback=1h")["data"] or []

    def wait_for_traces(self, service: str, predicate, timeout: float = 30.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        traces = []
        while time.monotonic() < deadline:
            if service in self.services():
                traces = self.traces(service)
                if predicate(traces):
                    return traces
            time.sleep(0.3)
        return traces


def jaeger_tag(span: dict, key: str):
    return next((t["value"] for t in span.get("tags", ()) if t["key"] == key), None)


def jaeger_parent(span: dict) -> str | None:
    """The span id of the span's CHILD_OF parent, if any."""
    return next((r["spanID"] for r in span.get("references", ()) if r["refType"] == "CHILD_OF"), None)
