"""The node-wide set-up: kubernetes/daemonset.yaml (the agent in the host's PID namespace on every
node, and a collector per node) and collector-config/otelcol-k8s.yaml (k8s_attributes associating
by the container.id and k8s.pod.uid the agent reads from cgroups). No cluster runs here: the
manifests are validated against the Kubernetes schema and against the sidecar's tested settings,
and the collector configuration by a real collector build that includes the k8s_attributes processor."""

import copy
import re
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from helpers import ROOT
from otel_goroutines import cli
from otel_goroutines.cgroup_identity import identity_from_cgroup
from otel_peers import COLLECTOR_CONFIGS, PEERS_SRC, build_k8s_collector, validate_config
from test_sidecar import CAPS, HEALTH_FILE, K8S as SIDECAR, _flag_value

DAEMONSET = ROOT / "kubernetes" / "daemonset.yaml"
COLLECTOR_CONFIG = COLLECTOR_CONFIGS / "otelcol-k8s.yaml"


def _docs(path) -> dict:
    """The manifest's objects by (kind, name)."""
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(path.read_text()) if d}


@pytest.fixture(scope="module")
def manifest():
    return _docs(DAEMONSET)


def test_daemonset_manifest_is_valid_against_the_schema(manifest):
    version = kubernetes_validate.utils.latest_version()
    for doc in manifest.values():
        kubernetes_validate.validate(doc, version, strict=True)
    broken = copy.deepcopy(manifest[("DaemonSet", "otel-goroutines")])
    broken["spec"]["template"]["spec"]["hostPid"] = True  # misspelt: the schema check can fail
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_agent_runs_node_wide_with_the_sidecars_tested_privileges(manifest):
    pod = manifest[("DaemonSet", "otel-goroutines")]["spec"]["template"]["spec"]
    assert pod["hostPID"] is True and {"operator": "Exists"} in pod["tolerations"]
    (agent,) = pod["containers"]
    sidecar_pod = next(iter(_docs(SIDECAR).values()))["spec"]["template"]["spec"]
    sidecar = next(c for c in sidecar_pod["containers"] if c["name"] == "otel-goroutines")
    # Exactly what tests/e2e/test_sidecar.py measured as enough and each needed, the same mounts.
    assert agent["securityContext"] == sidecar["securityContext"]
    assert set(agent["securityContext"]["capabilities"]["add"]) == CAPS and not agent["securityContext"].get("privileged")
    assert agent["volumeMounts"] == sidecar["volumeMounts"] and pod["volumes"] == sidecar_pod["volumes"]
    args = agent["args"]
    assert args[0] == "watch" and not {"--exe-name", "--exe-path", "--pid-file"} & set(args)  # every Go process
    assert _flag_value(args, "--health-file") == HEALTH_FILE
    assert _flag_value(args, "--max-overhead") == "5"  # the budget holds for each process on the node (hits counted per process)
    collector = manifest[("DaemonSet", "otel-goroutines-collector")]["spec"]["template"]["spec"]["containers"][0]
    assert collector["image"].startswith("otel/opentelemetry-collector-contrib:")  # whose executable is /otelcol-contrib
    parsed = cli.watch.make_context("watch", args[1:]).params  # the manifest's arguments, read by the agent's own parser
    assert parsed["exclude_exe_name"] == ("otelcol-contrib",)  # not the collector its spans go to
    assert agent["livenessProbe"]["exec"]["command"][:4] == ["otel-goroutines", "health", "--file", HEALTH_FILE]
    assert pod["terminationGracePeriodSeconds"] > float(_flag_value(args, "--shutdown-timeout"))
    env = {e["name"]: e for e in agent["env"]}
    assert "OTEL_SERVICE_NAME" not in env  # one agent, many services: each named after its executable
    assert "k8s.pod" not in env["OTEL_RESOURCE_ATTRIBUTES"]["value"]  # the agent's own pod is no process's
    assert list(env).index("NODE_NAME") < list(env).index("OTEL_RESOURCE_ATTRIBUTES")


def test_agent_sends_to_its_nodes_collector(manifest):
    agent = manifest[("DaemonSet", "otel-goroutines")]["spec"]["template"]["spec"]["containers"][0]
    endpoint = urlparse(next(e["value"] for e in agent["env"] if e["name"] == "OTEL_EXPORTER_OTLP_ENDPOINT"))
    service = manifest[("Service", endpoint.hostname)]
    assert service["spec"]["internalTrafficPolicy"] == "Local"
    assert service["metadata"]["namespace"] == manifest[("DaemonSet", "otel-goroutines")]["metadata"]["namespace"]
    port = next(p for p in service["spec"]["ports"] if p["port"] == endpoint.port)
    collector = manifest[("DaemonSet", "otel-goroutines-collector")]
    assert service["spec"]["selector"] == collector["spec"]["template"]["metadata"]["labels"]
    (container,) = collector["spec"]["template"]["spec"]["containers"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    env = {e["name"]: e for e in container["env"]}
    config = yaml.safe_load(COLLECTOR_CONFIG.read_text())
    assert env["KUBE_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert config["processors"]["k8s_attributes"]["filter"]["node_from_env_var"] == "KUBE_NODE_NAME"
    assert "OTLP_EXPORTER_ENDPOINT" in env and "${env:OTLP_EXPORTER_ENDPOINT" in config["exporters"]["otlp"]["endpoint"]
    # The image is the release the configuration is validated with (tests/peers/otelcol-k8s/go.mod).
    validated = re.search(r"k8sattributesprocessor v(\S+)", (PEERS_SRC / "otelcol-k8s" / "go.mod").read_text()).group(1)
    assert container["image"] == f"otel/opentelemetry-collector-contrib:{validated}"
    assert container["args"] == ["--config=/etc/otelcol/config.yaml"]
    assert collector["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] == "otel-goroutines-collector"
    assert "--from-file=config.yaml=collector-config/otelcol-k8s.yaml" in DAEMONSET.read_text()  # how that ConfigMap is made


def test_collector_may_read_what_k8s_attributes_needs(manifest):
    collector = manifest[("DaemonSet", "otel-goroutines-collector")]["spec"]["template"]["spec"]
    binding = manifest[("ClusterRoleBinding", "otel-goroutines-collector")]
    (subject,) = binding["subjects"]
    assert (subject["name"], subject["namespace"]) == (collector["serviceAccountName"], "observability")
    assert ("ServiceAccount", subject["name"]) in manifest
    role = manifest[("ClusterRole", binding["roleRef"]["name"])]
    granted = {(group, resource) for rule in role["rules"] if set(rule["verbs"]) >= {"get", "list", "watch"}
               for group in rule["apiGroups"] for resource in rule["resources"]}
    assert granted >= {("", "pods"), ("", "namespaces"), ("apps", "replicasets")}


# --- the collector configuration -------------------------------------------------------------
@pytest.fixture(scope="module")
def otelcol_k8s():
    return build_k8s_collector()


def test_k8s_collector_config_is_valid(otelcol_k8s):
    result = validate_config(otelcol_k8s, COLLECTOR_CONFIG, {"KUBE_NODE_NAME": "node-1"})
    assert result.returncode == 0, result.stderr + result.stdout


@pytest.mark.parametrize("good, bad", [
    ("- k8s.container.name ", "- k8s.containr.name "),        # a metadata field it does not know
    ("auth_type: serviceAccount", "auth_type: serviceAcount"),  # no such way to reach the API
])
def test_validate_rejects_a_broken_k8s_attributes_config(otelcol_k8s, tmp_path, good, bad):
    """The check above can fail, in the processor's own settings (which the core collector cannot check)."""
    broken = tmp_path / "broken.yaml"
    assert good in COLLECTOR_CONFIG.read_text()
    broken.write_text(COLLECTOR_CONFIG.read_text().replace(good, bad))
    result = validate_config(otelcol_k8s, broken, {"KUBE_NODE_NAME": "node-1"})
    assert result.returncode != 0
    assert bad.split()[-1] in result.stderr + result.stdout


def test_pods_are_associated_by_what_the_agent_reads_from_cgroups():
    config = yaml.safe_load(COLLECTOR_CONFIG.read_text())
    k8s = config["processors"]["k8s_attributes"]
    associated_by = [source["name"] for rule in k8s["pod_association"] for source in rule["sources"]]
    sample = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod%s.slice/cri-containerd-%s.scope" % (
        "9e1d5c52_8a8f_4a5b_9a59_2c1e0c6d5e3a", "ab" * 32)
    assert set(associated_by) == set(identity_from_cgroup(sample))
    assert associated_by == ["container.id", "k8s.pod.uid"]  # the container first: it names the container too
    # Association by container.id takes a container attribute among those extracted.
    assert {"k8s.container.name", "k8s.pod.name", "k8s.namespace.name", "k8s.deployment.name"} <= set(k8s["extract"]["metadata"])
    for pipeline in config["service"]["pipelines"].values():
        assert "k8s_attributes" in pipeline["processors"]
