"""Which container and pod a process runs in, read from its cgroup path (/proc/PID/cgroup).

The kubelet and the container runtimes name cgroups after the pod's UID and the container's ID:

  cgroup v2, systemd driver   0::/kubepods.slice/kubepods-burstable.slice/
                                 kubepods-burstable-pod<uid, '_' for '-'>.slice/cri-containerd-<id>.scope
                                 (crio-<id>.scope for CRI-O, docker-<id>.scope for cri-dockerd)
  cgroup v1, cgroupfs driver  4:memory:/kubepods/burstable/pod<uid>/<id>   (crio-<id> for CRI-O)
  Docker, Podman alone        /docker/<id>, /system.slice/docker-<id>.scope, /machine.slice/libpod-<id>.scope

An agent in a cgroup namespace of its own (a DaemonSet pod on cgroup v2) sees other pods' paths
relative to its own cgroup ("0::/../../kubepods-besteffort-pod<uid>.slice/cri-containerd-<id>.scope"):
the names are what count, not where the path starts. The result carries the semantic-convention
names container.id and k8s.pod.uid: what the Collector's k8sattributes processor associates by."""

from __future__ import annotations

import logging
import re

log = logging.getLogger("otel_goroutines")

# A container's cgroup: the runtime's prefix (or none), 64 hex digits, and for systemd ".scope".
_CONTAINER = re.compile(r"^(?:(?:cri-containerd|crio|docker|libpod)-)?([0-9a-f]{64})(?:\.scope)?$")
# A pod's cgroup: "pod" + its UID (dashes, or underscores under systemd; 32 bare hex digits for a static pod).
_POD = re.compile(r"pod([0-9a-f]{8}[-_]?[0-9a-f]{4}[-_]?[0-9a-f]{4}[-_]?[0-9a-f]{4}[-_]?[0-9a-f]{12})(?:\.slice)?$")


def identity_from_cgroup(text: str) -> dict[str, str]:
    """container.id and k8s.pod.uid from the text of /proc/PID/cgroup: those it names, none when
    the process is in no container. The cgroup v2 line is read first, then the v1 lines (in a
    hybrid set-up the v2 path may be "/" while the v1 controllers hold the container's path)."""
    lines = [line.split(":", 2) for line in text.splitlines() if line.count(":") >= 2]
    v2 = [path for hierarchy, _, path in lines if hierarchy == "0"]
    v1 = [path for hierarchy, _, path in lines if hierarchy != "0"]
    for path in v2 + v1:
        identity = _identity_from_path(path)
        if identity:
            return identity
    return {}


def _identity_from_path(path: str) -> dict[str, str]:
    identity = {}
    for name in path.split("/"):
        if (container := _CONTAINER.match(name)) is not None:
            identity["container.id"] = container.group(1)
        elif (pod := _POD.search(name)) is not None and name.startswith(("pod", "kubepods")):
            identity["k8s.pod.uid"] = pod.group(1).replace("_", "-")
    return identity


def process_identity(pid: int, proc_root: str = "/proc") -> dict[str, str]:
    """identity_from_cgroup of a running process; {} (with a warning) if its cgroup cannot be read."""
    try:
        with open(f"{proc_root}/{pid}/cgroup") as f:
            return identity_from_cgroup(f.read())
    except OSError as e:
        log.warning("could not read the cgroup of PID %d (%s): its spans carry no container.id or k8s.pod.uid",
                    pid, e.strerror or e)
        return {}
