"""Pod identity for real: a Go program in a kubelet-style cgroup v2 hierarchy this test creates
(kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope),
found by `watch`, its spans and metrics exported with container.id and k8s.pod.uid on their resource."""

import secrets
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from helpers import AGENT, poll

pytestmark = pytest.mark.ebpf


def cgroup2_root() -> Path:
    """Where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid host."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _source, target, fstype, *_ = line.split()
        if fstype == "cgroup2":
            return Path(target)
    raise AssertionError("no cgroup v2 hierarchy is mounted")


@pytest.fixture
def kubelet_cgroup():
    """A fresh pod and container cgroup as the kubelet (systemd driver) and containerd name them;
    removed innermost first once its processes are gone."""
    pod_uid, container_id = str(uuid.uuid4()), secrets.token_hex(32)
    root = cgroup2_root()
    levels = ["kubepods.slice", "kubepods-burstable.slice", f"kubepods-burstable-pod{pod_uid.replace('-', '_')}.slice",
              f"cri-containerd-{container_id}.scope"]
    path = root.joinpath(*levels)
    path.mkdir(parents=True)
    yield path, pod_uid, container_id
    for pid in (path / "cgroup.procs").read_text().split():  # a process the test left: back to the root
        (root / "cgroup.procs").write_text(pid)
    for depth in range(len(levels), 0, -1):
        try:
            root.joinpath(*levels[:depth]).rmdir()
        except OSError:  # kubepods.slice and kubepods-burstable.slice: another test run may be using them
            assert depth <= 2, f"could not remove {root.joinpath(*levels[:depth])}"


def _resource(attributes) -> dict:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in attributes}


def test_watch_labels_a_process_with_its_pod_and_container(programs, receiver, kubelet_cgroup, tmp_path):
    cgroup, pod_uid, container_id = kubelet_cgroup
    name = f"ticker-{secrets.token_hex(4)}"
    binary = tmp_path / name
    shutil.copy(programs["ticker"], binary)
    # The program enters the container's cgroup before its first instruction, as a container's would.
    service = subprocess.Popen(["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$0" "$@"', str(binary),
                                str(tmp_path / "manifest.json"), "120s"])
    agent_log = tmp_path / "agent.log"
    agent = subprocess.Popen(AGENT + ["watch", "-q", "--exe-name", name, "--scan-interval", "0.2", "--exporter", "otlp",
                                      "--protocol", "http/protobuf", "--endpoint", f"http://127.0.0.1:{receiver.port}",
                                      "--metrics-interval", "1"], stdout=open(agent_log, "w"), stderr=subprocess.STDOUT)
    log = agent_log.read_text
    try:
        assert poll(lambda: "0::/kubepods.slice/" in Path(f"/proc/{service.pid}/cgroup").read_text(), 10)
        ticks = lambda spans: [s for s in spans if s.name == "main.tick" and s.resource.get("process.pid") == service.pid]
        assert poll(lambda: len(ticks(receiver.spans)) >= 5, 60), log()
        metric_resources = lambda: [_resource(rm.resource.attributes) for req in receiver.metrics for rm in req.resource_metrics]
        assert poll(lambda: any(r.get("process.pid") == service.pid for r in metric_resources()), 30), log()
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0, log()
    finally:
        for proc in (agent, service):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert "Traceback" not in log() and "WARNING" not in log(), log()
    expected = {"container.id": container_id, "k8s.pod.uid": pod_uid}  # the UID with its dashes back
    for resource in [s.resource for s in ticks(receiver.spans)] + [r for r in metric_resources() if r.get("process.pid") == service.pid]:
        assert {k: resource.get(k) for k in expected} == expected, resource
