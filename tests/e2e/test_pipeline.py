"""The sidecar's pipeline for real: agent -> OpenTelemetry Collector running a configuration from
collector-config/ -> Jaeger v2, read back through Jaeger's query API (what its UI shows).
Tempo cannot be built here: its leg of the configurations goes to rotel, a real OTLP/gRPC
receiver, standing in for it."""

import json
import os
import secrets
import signal
import subprocess
import time

import pytest

from helpers import attach_to_ticker, by_goid, run_agent
from otel_peers import COLLECTOR_CONFIGS, Collector, Jaeger, build_peers, jaeger_parent, jaeger_tag, validate_config

pytestmark = pytest.mark.ebpf

# otelcol-k8s.yaml needs the contrib k8s_attributes processor: tests/e2e/test_node_wide.py validates it.
CONFIGS = sorted(p.name for p in COLLECTOR_CONFIGS.glob("*.yaml") if p.name != "otelcol-k8s.yaml")


@pytest.fixture(scope="module")
def peers():
    return build_peers()


@pytest.fixture(scope="module")
def jaeger(peers, tmp_path_factory):
    j = Jaeger(peers["jaeger"], tmp_path_factory.mktemp("jaeger") / "jaeger.log")
    yield j
    j.close()


def test_the_three_configurations_exist():
    assert CONFIGS == ["otelcol-jaeger-tempo.yaml", "otelcol-jaeger.yaml", "otelcol-tempo.yaml"]


@pytest.mark.parametrize("config", CONFIGS)
def test_collector_config_is_valid(peers, config):
    result = validate_config(peers["otelcol"], COLLECTOR_CONFIGS / config)
    assert result.returncode == 0, result.stderr + result.stdout


def test_validate_rejects_a_broken_config(peers, tmp_path):
    """The check above can fail: a pipeline naming an exporter that is not configured."""
    broken = tmp_path / "broken.yaml"
    broken.write_text((COLLECTOR_CONFIGS / "otelcol-jaeger.yaml").read_text().replace("[otlp/jaeger, debug]", "[otlp/nowhere, debug]"))
    result = validate_config(peers["otelcol"], broken)
    assert result.returncode != 0
    assert "otlp/nowhere" in result.stderr + result.stdout


@pytest.mark.parametrize("config", CONFIGS)
def test_goroutine_trees_through_the_collector(config, peers, jaeger, rotel, receiver, programs, tmp_path):
    receiver.clear()
    collector = Collector(peers["otelcol"], COLLECTOR_CONFIGS / config, tmp_path / "otelcol.log",
                          jaeger_grpc=jaeger.otlp_grpc, tempo_grpc=rotel.grpc_port)
    service = f"tree-{secrets.token_hex(4)}"
    manifest_path = tmp_path / "manifest.json"
    try:
        run = run_agent(["run", "--endpoint", collector.endpoint("grpc"), "--protocol", "grpc", "--quiet", "--",
                         str(programs["tree"]), str(manifest_path)], env={"OTEL_SERVICE_NAME": service})
        assert run.returncode == 0, run.stderr
        manifest = json.loads(manifest_path.read_text())
        expected = {g["goid"] for g in manifest["goroutines"]} | {manifest["main_goid"]}
        to_jaeger, to_tempo = "jaeger" in config, "tempo" in config

        if to_tempo:  # the Tempo leg: the same spans reach the OTLP receiver behind rotel
            got = receiver.wait_for(lambda spans: expected <= {s.attributes["go.goroutine.id"] for s in spans
                                                               if s.resource.get("service.name") == service}, 30)
            mine = by_goid([s for s in got if s.resource.get("service.name") == service])
            assert expected <= set(mine), collector.log()[-2000:]
            assert mine[manifest["main_goid"]].name == "runtime.main"

        if not to_jaeger:
            assert service not in jaeger.services()
            return
        traces = jaeger.wait_for_traces(service, lambda ts: expected <= {jaeger_tag(s, "go.goroutine.id")
                                                                         for t in ts for s in t["spans"]})
        assert traces, f"Jaeger has no trace of {service}; collector log:\n{collector.log()[-2000:]}"
        assert len(traces) == 1  # one program run, one goroutine tree, one trace
        trace = traces[0]
        spans = {s["spanID"]: s for s in trace["spans"]}
        goroutines = {}
        for s in trace["spans"]:
            goid = jaeger_tag(s, "go.goroutine.id")
            assert goid not in goroutines, f"goroutine {goid} twice in Jaeger"
            goroutines[goid] = s
        root = goroutines[manifest["main_goid"]]
        assert root["operationName"] == "runtime.main" and jaeger_parent(root) is None
        process = trace["processes"][root["processID"]]
        assert process["serviceName"] == service
        assert {t["key"]: t["value"] for t in process["tags"]}["process.runtime.name"] == "go"
        for g in manifest["goroutines"]:
            span = goroutines[g["goid"]]
            assert span["operationName"] == g["func"]
            assert jaeger_tag(span, "code.function.name") == g["func"]
            parent = spans[jaeger_parent(span)]  # the tree, as Jaeger shows it
            assert jaeger_tag(parent, "go.goroutine.id") == g["parent"]
            assert parent["operationName"] == ("main.worker" if g["func"] == "main.leaf" else "runtime.main")
        leaves = [s for s in trace["spans"] if s["operationName"] == "main.leaf"]
        assert len(leaves) == 6 and {spans[jaeger_parent(s)]["operationName"] for s in leaves} == {"main.worker"}
    finally:
        collector.close()


def test_the_compose_demo_without_docker(peers, jaeger, tmp_path):
    """docker/compose.yaml's topology with the same parts, as processes: the demo service in its
    long-running mode, the agent watching for it (started first, as a sidecar is), the collector
    running the compose file's configuration, Jaeger. Each request's goroutines are a trace."""
    from helpers import AGENT, ROOT, go_toolchain
    demo = tmp_path / f"demo-{secrets.token_hex(4)}"  # a name only this test's agent looks for
    subprocess.run([go_toolchain(), "build", "-o", str(demo), "."], cwd=ROOT / "demo", check=True,
                   env=dict(os.environ, GOTOOLCHAIN="local", GOFLAGS="-mod=mod", CGO_ENABLED="0"))
    collector = Collector(peers["otelcol"], COLLECTOR_CONFIGS / "otelcol-jaeger-tempo.yaml", tmp_path / "otelcol.log",
                          jaeger_grpc=jaeger.otlp_grpc)
    service = demo.name
    env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint("grpc"), OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
               OTEL_SERVICE_NAME=service)
    log = open(tmp_path / "agent.log", "w")
    agent = subprocess.Popen(AGENT + ["watch", "-q", "--exe-name", demo.name, "--scan-interval", "0.2"], env=env,
                             stdout=log, stderr=subprocess.STDOUT)
    server = None
    try:
        time.sleep(1.0)
        server = subprocess.Popen([str(demo), "-serve"], stdout=subprocess.PIPE, text=True)
        is_request = lambda trace: any(s["operationName"] == "main.handle" for s in trace["spans"])
        traces = jaeger.wait_for_traces(service, lambda ts: sum(map(is_request, ts)) >= 20, timeout=60)
        server.send_signal(signal.SIGTERM)
        assert server.wait(10) == 0
        assert "demo: handled" in server.stdout.read()
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0
    finally:
        for proc in (server, agent):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        log.close()
        collector.close()
    agent_log = (tmp_path / "agent.log").read_text()
    assert f"tracing PID {server.pid}" in agent_log and "Traceback" not in agent_log
    requests = [t for t in traces if is_request(t)]
    assert len(requests) >= 20, f"{len(requests)} request traces in Jaeger; agent log:\n{agent_log[-2000:]}"
    complete = 0
    for trace in requests:
        spans = {s["spanID"]: s for s in trace["spans"]}
        (handle,) = [s for s in trace["spans"] if s["operationName"] == "main.handle"]
        # Each request starts a trace of its own (main is a spawner), linked to its creator's span.
        assert jaeger_parent(handle) is None
        assert jaeger_tag(handle, "go.goroutine.trace_reason") in ("spawner", "untraced_parent")
        lookups = [s for s in trace["spans"] if s["operationName"] == "main.lookup"]
        assert all(spans[jaeger_parent(s)] is handle for s in lookups)
        complete += len(lookups) == 3
    assert complete >= len(requests) - 2  # the first request may have begun before the attach


def test_attach_lands_in_the_applications_service(peers, jaeger, programs, tmp_path):
    """Attached, the goroutine spans take the service of the target's own OTEL_SERVICE_NAME (not the
    executable's name) and its OTEL_RESOURCE_ATTRIBUTES, as Jaeger shows them."""
    collector = Collector(peers["otelcol"], COLLECTOR_CONFIGS / "otelcol-jaeger.yaml", tmp_path / "otelcol.log",
                          jaeger_grpc=jaeger.otlp_grpc)
    service = f"ticker-svc-{secrets.token_hex(4)}"
    ticks = lambda ts: sum(s["operationName"] == "main.tick" for t in ts for s in t["spans"])
    try:
        _, err = attach_to_ticker(programs["ticker"], tmp_path, ["--endpoint", collector.endpoint("grpc"), "--protocol", "grpc"],
                                  {"OTEL_SERVICE_NAME": service, "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=staging"},
                                  lambda: service in jaeger.services() and ticks(jaeger.traces(service)) >= 10)
    finally:
        collector.close()
    traces = jaeger.wait_for_traces(service, lambda ts: ticks(ts) >= 10)
    assert ticks(traces) >= 10, err
    assert programs["ticker"].name not in jaeger.services()
    for trace in traces:
        for process in trace["processes"].values():
            assert process["serviceName"] == service
            assert {t["key"]: t["value"] for t in process["tags"]}["deployment.environment"] == "staging"


def test_metrics_straight_to_jaeger_said_once(jaeger, programs, tmp_path):
    """Jaeger takes no metrics (gRPC UNIMPLEMENTED): one warning, no error at every interval, metrics not
    sent any more and counted; the spans still arrive."""
    service = f"ticker-{secrets.token_hex(4)}"
    # Traced until Jaeger holds 100 ticks: a second of ticks at least, five metrics intervals.
    ticks = lambda: service in jaeger.services() and \
        sum(s["operationName"] == "main.tick" for t in jaeger.traces(service) for s in t["spans"]) >= 100
    _, err = attach_to_ticker(programs["ticker"], tmp_path, ["--endpoint", f"http://127.0.0.1:{jaeger.otlp_grpc}", "--protocol",
                                                             "grpc", "--metrics-interval", "0.2"], {"OTEL_SERVICE_NAME": service}, ticks)
    assert ticks(), err
    assert err.count("takes no metrics (gRPC UNIMPLEMENTED)") == 1, err
    assert "ERROR" not in err and "Failed to export" not in err, err
    not_sent = int(err.split("losses: ")[1].split("metrics_not_sent=")[1].split()[0].rstrip(","))
    assert not_sent >= 2, err  # the refused one, at least the final one
