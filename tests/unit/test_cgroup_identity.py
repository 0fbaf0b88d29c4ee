"""container.id and k8s.pod.uid from /proc/PID/cgroup texts as each runtime, cgroup driver and
cgroup version writes them (the kubelet's and the runtimes' naming, recorded from real nodes)."""

import logging

import pytest

from otel_goroutines.cgroup_identity import identity_from_cgroup, process_identity

CID = "4f1d2a3b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e4f5a6b"
UID = "9e1d5c52-8a8f-4a5b-9a59-2c1e0c6d5e3a"
SYSTEMD_UID = UID.replace("-", "_")
STATIC_UID = "5d3f0c9e8b7a6f5e4d3c2b1a09f8e7d6"  # a static pod's: a hash, no dashes
BOTH = {"container.id": CID, "k8s.pod.uid": UID}

V1_CONTROLLERS = ["12:hugetlb", "11:pids", "10:memory", "9:cpu,cpuacct", "8:blkio", "7:devices", "6:freezer",
                  "5:net_cls,net_prio", "4:perf_event", "3:cpuset", "2:rdma", "1:name=systemd"]


def v1(path: str, v2_line: str | None = None) -> str:
    """A cgroup v1 (or hybrid) text: every controller at PATH, and the v2 line a hybrid host adds."""
    lines = [f"{c}:{path}" for c in V1_CONTROLLERS] + ([v2_line] if v2_line else [])
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, expected", [
    # cgroup v2, systemd driver (the default of kubeadm, EKS, GKE, AKS): containerd, each QoS class
    (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SYSTEMD_UID}.slice/cri-containerd-{CID}.scope\n", BOTH),
    (f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{SYSTEMD_UID}.slice/cri-containerd-{CID}.scope\n", BOTH),
    (f"0::/kubepods.slice/kubepods-pod{SYSTEMD_UID}.slice/cri-containerd-{CID}.scope\n", BOTH),  # Guaranteed
    # CRI-O and cri-dockerd under systemd
    (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SYSTEMD_UID}.slice/crio-{CID}.scope\n", BOTH),
    (f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{SYSTEMD_UID}.slice/docker-{CID}.scope\n", BOTH),
    # cgroup v2 seen from an agent in its own cgroup namespace (a DaemonSet pod): relative paths
    (f"0::/../../kubepods-besteffort.slice/kubepods-besteffort-pod{SYSTEMD_UID}.slice/cri-containerd-{CID}.scope\n", BOTH),
    (f"0::/../../../kubepods/burstable/pod{UID}/{CID}\n", BOTH),
    (f"0::/../cri-containerd-{CID}.scope\n", {"container.id": CID}),  # a sidecar's neighbour, from the sidecar's namespace
    # cgroup v1, cgroupfs driver: containerd (bare ID), CRI-O (crio-ID), Guaranteed pods directly under kubepods
    (v1(f"/kubepods/burstable/pod{UID}/{CID}"), BOTH),
    (v1(f"/kubepods/besteffort/pod{UID}/crio-{CID}"), BOTH),
    (v1(f"/kubepods/pod{UID}/{CID}"), BOTH),
    # cgroup v1, systemd driver; and a hybrid host whose v2 line is the root while v1 holds the container
    (v1(f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SYSTEMD_UID}.slice/cri-containerd-{CID}.scope"), BOTH),
    (v1(f"/kubepods/burstable/pod{UID}/{CID}", v2_line="0::/"), BOTH),
    # a static pod (kubelet's own manifests): its UID is a bare hash
    (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC_UID}.slice/cri-containerd-{CID}.scope\n",
     {"container.id": CID, "k8s.pod.uid": STATIC_UID}),
    # containers outside Kubernetes: Docker (cgroupfs v1, systemd v2), Podman
    (v1(f"/docker/{CID}"), {"container.id": CID}),
    (f"0::/system.slice/docker-{CID}.scope\n", {"container.id": CID}),
    (f"0::/machine.slice/libpod-{CID}.scope\n", {"container.id": CID}),
    (f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope/container\n", {"container.id": CID}),
    # a pod's cgroup but no container's: CRI-O's conmon, a process in the pod slice itself
    (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SYSTEMD_UID}.slice/crio-conmon-{CID}.scope\n",
     {"k8s.pod.uid": UID}),
    # no container at all: a host service, this machine's own hybrid text, the root, nothing readable
    ("0::/system.slice/ssh.service\n", {}),
    (v1("/", v2_line="0::/").replace("10:memory:/", "10:memory:/process_api/10168da29ca50641b3a34b32dbb32f65"), {}),
    ("0::/\n", {}),
    ("", {}),
    ("not a cgroup file\n", {}),
], ids=["v2-systemd-containerd-burstable", "v2-systemd-containerd-besteffort", "v2-systemd-containerd-guaranteed",
        "v2-systemd-crio", "v2-systemd-cri-dockerd", "v2-cgroupns-systemd", "v2-cgroupns-cgroupfs", "v2-cgroupns-sidecar",
        "v1-cgroupfs-containerd", "v1-cgroupfs-crio", "v1-cgroupfs-guaranteed", "v1-systemd-containerd",
        "hybrid-v2-root", "static-pod", "docker-v1", "docker-v2-systemd", "podman", "podman-rootless",
        "crio-conmon", "host-service", "this-machine", "root", "empty", "garbage"])
def test_identity_from_cgroup(text, expected):
    assert identity_from_cgroup(text) == expected


def test_process_identity_reads_proc(tmp_path):
    (tmp_path / "123").mkdir()
    (tmp_path / "123" / "cgroup").write_text(v1(f"/kubepods/burstable/pod{UID}/{CID}"))
    assert process_identity(123, proc_root=str(tmp_path)) == BOTH


def test_process_identity_of_a_gone_process_warns_once(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="otel_goroutines"):
        assert process_identity(99, proc_root=str(tmp_path)) == {}
    (record,) = caplog.records
    assert record.getMessage().startswith("could not read the cgroup of PID 99 (No such file or directory)")
