"""The sidecar's pipeline for real: agent -> OpenTelemetry Collector running a configuration from
collector-config/ -> Jaeger v2, read back through Jaeger's query API (what its UI shows).
Tempo cannot be built here: its leg of the configurations goes to rotel, a real OTLP/gRPC
receiver, standing in for it."""

import json
import math
import os
import secrets
import signal
import subprocess
import time
from collections import Counter

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


# --- issue 13, items 1 and 2, as Jaeger shows them ---------------------------------------------------
GROUP_WINDOW_S = 1.0


@pytest.fixture(scope="module")
def spawners_in_jaeger(peers, jaeger, tmp_path_factory):
    """tests/programs/spawners (a ticker and a dispatcher of short goroutines, 4 s) traced past several
    checkpoints, through the collector into Jaeger; Jaeger's traces once it holds every span exported."""
    from helpers import build_program
    tmp = tmp_path_factory.mktemp("spawners")
    collector = Collector(peers["otelcol"], COLLECTOR_CONFIGS / "otelcol-jaeger.yaml", tmp / "otelcol.log",
                          jaeger_grpc=jaeger.otlp_grpc)
    service = f"spawners-{secrets.token_hex(4)}"
    try:
        run = run_agent(["run", "--endpoint", collector.endpoint("grpc"), "--protocol", "grpc", "--quiet",
                         "--checkpoint-after", "0.5", "--group-window", str(GROUP_WINDOW_S), "--",
                         str(build_program("spawners")), str(tmp / "manifest.json")], env={"OTEL_SERVICE_NAME": service})
        assert run.returncode == 0, run.stderr
        exported = int(run.stderr.split(" spans exported over OTLP")[0].split()[-1])
        traces = jaeger.wait_for_traces(service, lambda ts: sum(len(t["spans"]) for t in ts) >= exported, timeout=60)
        assert sum(len(t["spans"]) for t in traces) == exported, collector.log()[-2000:]
    finally:
        collector.close()
    return dict(traces=traces, manifest=json.loads((tmp / "manifest.json").read_text()), err=run.stderr)


def _jaeger_end(span):
    return span["startTime"] + span["duration"]


def _jaeger_goroutine(traces, name, partial=False):
    (span,) = [s for t in traces for s in t["spans"]
               if s["operationName"] == name and bool(jaeger_tag(s, "go.goroutine.partial")) == partial]
    return span


def test_jaeger_long_lived_parents_come_before_their_children(spawners_in_jaeger):
    """Item 1: the final span of a goroutine that outlived several checkpoints covers its whole life,
    so in Jaeger no span starts before its parent, and none is flagged (warnings) for it."""
    traces = spawners_in_jaeger["traces"]
    for trace in traces:
        spans = {s["spanID"]: s for s in trace["spans"]}
        for span in trace["spans"]:
            parent = spans.get(jaeger_parent(span))
            if parent is not None:
                assert parent["startTime"] <= span["startTime"], (span["operationName"], parent["operationName"])
            if span.get("warnings"):
                # Jaeger's one warning a true span may draw: a child ending after its shorter-lived creator.
                # A fan-out's Wait returns at its parts' Done, and a part reaches its exit a moment later:
                # on a loaded machine, after its fan-out's (seen once). Nothing else may draw one.
                # (Jaeger gives microseconds, start and duration each truncated: hence the 1.)
                assert span["operationName"] == "main.part" and parent is not None, span["warnings"]
                assert _jaeger_end(span) >= _jaeger_end(parent) - 1, span["warnings"]
    for name in ("main.ticker", "main.dispatcher"):
        final = _jaeger_goroutine(traces, name)
        assert jaeger_tag(final, "go.goroutine.checkpoints") >= 3
        (trace,) = [t for t in traces if final in t["spans"]]
        children = [s for s in trace["spans"] if jaeger_parent(s) == final["spanID"]]
        assert len(children) >= 10  # its first children, in its first second, under it
        recorded = next(g for g in spawners_in_jaeger["manifest"]["goroutines"] if g["func"] == name)
        assert final["startTime"] <= recorded["started"] // 1000 and recorded["ended"] // 1000 <= _jaeger_end(final)


def test_jaeger_short_goroutines_of_spawners_are_grouped(spawners_in_jaeger):
    """Item 2: in Jaeger's trace list, a spawner's short childless goroutines make one trace per window,
    rooted at a span of the group that holds them side by side; the service's traces stay few."""
    traces, manifest = spawners_in_jaeger["traces"], spawners_in_jaeger["manifest"]
    windows = math.ceil((manifest["stopped"] - manifest["started"]) / 1e9 / GROUP_WINDOW_S) + 1
    roots = {}
    for trace in traces:
        top = [s for s in trace["spans"] if jaeger_parent(s) is None]
        if all(jaeger_tag(s, "go.goroutine.partial") for s in trace["spans"]):  # a goroutine's checkpoints, side by side
            assert len({jaeger_tag(s, "go.goroutine.id") for s in top}) == 1
            continue
        (roots[trace["traceID"]],) = top  # one root a trace: no orphan
    for spawner, short in (("main.ticker", "main.beat"), ("main.dispatcher", "main.work")):
        groups = [t for t in traces if t["traceID"] in roots and roots[t["traceID"]]["operationName"] == f"short goroutines of {spawner}"]
        assert 2 <= len(groups) <= windows
        for trace in groups:
            root = roots[trace["traceID"]]
            members = [s for s in trace["spans"] if s is not root]
            assert members and {s["operationName"] for s in members} == {short}
            assert {jaeger_parent(s) for s in members} == {root["spanID"]}
            assert jaeger_tag(root, "go.goroutine.group.goroutines") == len(members)
            assert root["startTime"] == min(s["startTime"] for s in members)
            # (Jaeger truncates starts and durations to microseconds: ends may differ by one.)
            assert _jaeger_end(root) >= max(_jaeger_end(s) for s in members) - 1
            assert [r["refType"] for r in root["references"]] == ["FOLLOWS_FROM"]  # the link to its spawner
    made = Counter(g["func"] for g in manifest["goroutines"])
    # A trace per group, per fanout (it starts goroutines: as before), the program's own tree, the
    # checkpoints of each long-lived goroutine, and the runtime's few: far fewer than goroutines.
    assert len(traces) <= 2 * windows + made["main.fanout"] + 20 < made["main.beat"] + made["main.work"]


def render_jaeger(trace: dict, shown: int = 3, at_root: int | None = None) -> str:
    """One trace as Jaeger's query API returns it, as a text tree: at most `at_root` children of a root
    (None: all), `shown` of any other span (by start)."""
    kids: dict[str | None, list[dict]] = {}
    for s in trace["spans"]:
        kids.setdefault(jaeger_parent(s), []).append(s)
    t0 = min(s["startTime"] for s in trace["spans"])
    rows = []

    def walk(span: dict, prefix: str, last: bool, depth: int) -> None:
        tags = {t["key"]: t["value"] for t in span["tags"]}
        group = "go.goroutine.group.goroutines" in tags
        what = f"{tags['go.goroutine.group.goroutines']} goroutines" if group else f"goroutine {tags['go.goroutine.id']}"
        notes = [f"{k[len('go.goroutine.'):]}={tags[k]}" for k in ("go.goroutine.trace_reason", "go.goroutine.checkpoints")
                 if k in tags]
        notes += ["linked to its spawner"] if group and span.get("references") else []
        branch = "" if depth == 0 else prefix + ("└─ " if last else "├─ ")
        rows.append((branch + span["operationName"], what, f"+{(span['startTime'] - t0) / 1e3:.1f} ms",
                     f"{span['duration'] / 1e3:.1f} ms", ", ".join(notes)))
        children = sorted(kids.get(span["spanID"], []), key=lambda s: s["startTime"])
        limit = (len(children) if at_root is None else at_root) if depth == 0 else shown
        inner = "" if depth == 0 else prefix + ("   " if last else "│  ")
        for i, kid in enumerate(children[:limit]):
            walk(kid, inner, i == len(children) - 1, depth + 1)
        if len(children) > limit:
            rows.append((inner + f"└─ ... {len(children) - limit} more {children[limit]['operationName']}", "", "", "", ""))

    for root in sorted(kids.get(None, []), key=lambda s: s["startTime"]):
        walk(root, "", True, 0)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}  {r[4]}".rstrip() for r in rows]
    return f"trace {trace['traceID']}  ({len(trace['spans'])} spans)\n" + "\n".join(lines)


def test_jaeger_render_a_long_running_service(spawners_in_jaeger):
    """The service's trace list and two traces as Jaeger shows them (pytest -s; the README shows them)."""
    traces = spawners_in_jaeger["traces"]
    roots = Counter()
    for t in traces:
        top = sorted((s for s in t["spans"] if jaeger_parent(s) is None), key=lambda s: s["startTime"])
        partial = jaeger_tag(top[0], "go.goroutine.partial")
        roots[f"{top[0]['operationName']}{' (checkpoints)' if partial else ''}"] += 1
    listing = "\n".join(f"{n:5} x {name}" for name, n in roots.most_common())
    main = next(t for t in traces if any(s["operationName"] == "runtime.main" and not jaeger_tag(s, "go.goroutine.partial")
                                        for s in t["spans"]))
    group = max((t for t in traces if any(s["operationName"] == "short goroutines of main.dispatcher" for s in t["spans"])),
                key=lambda t: len(t["spans"]))
    print(f"\n{len(traces)} traces, {sum(len(t['spans']) for t in traces)} spans, by root span:\n{listing}\n\n"
          f"{render_jaeger(main)}\n\n{render_jaeger(group, at_root=6)}")
    assert roots["short goroutines of main.ticker"] >= 2 and roots["main.fanout"] >= 20
    assert render_jaeger(group).splitlines()[1].startswith("short goroutines of main.dispatcher")


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
