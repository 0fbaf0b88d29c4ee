"""The agent image (docker/Dockerfile) built for real with podman: no Docker engine runs here, but
podman builds with --isolation=chroot. The base is Debian's bookworm made by debootstrap from
Debian's packages (minbase: about what debian:bookworm-slim holds) and imported into podman;
its root file system is cached as a tarball in .cache/images, so only a new machine makes it."""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from helpers import ROOT

IMAGES_CACHE = ROOT / ".cache" / "images"
BASE = "localhost/debian:bookworm-slim"
AGENT_IMAGE = "localhost/otel-goroutines:test"
BUILD_STAGE_IMAGE = "localhost/otel-goroutines:test-build"  # tagged too, so that a rebuild can remove its predecessor
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _podman(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], check=True, capture_output=True, text=True, **kwargs)


def _image_exists(name: str) -> bool:
    return subprocess.run(["podman", "image", "exists", name]).returncode == 0


def _image_id(name: str) -> str | None:
    found = subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", name], capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else None


def _base_rootfs() -> Path:
    """debootstrap's minbase bookworm as a tarball, less apt's package lists and downloads."""
    tarball = IMAGES_CACHE / "debian-bookworm-minbase.tar"
    if not tarball.exists():
        rootfs = Path(tempfile.mkdtemp(prefix="bookworm-", dir=IMAGES_CACHE))
        try:
            subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs)], check=True, capture_output=True)
            for leftovers in ("var/lib/apt/lists", "var/cache/apt/archives"):
                for path in (rootfs / leftovers).glob("*"):
                    if path.is_file():
                        path.unlink()
            subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tarball.with_suffix(".tmp")), "."], check=True)
            tarball.with_suffix(".tmp").rename(tarball)
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)
    return tarball


def _custom_ca() -> bool:
    """Whether this host trusts a CA of its own (a TLS-intercepting proxy's): pip in the build needs it too."""
    return any(Path("/usr/local/share/ca-certificates").glob("*.crt"))


def build_agent_image() -> dict:
    """Build docker/Dockerfile as AGENT_IMAGE on the cached base; its size and the build's times."""
    IMAGES_CACHE.mkdir(parents=True, exist_ok=True)
    with open(IMAGES_CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once build one after the other
        started = time.monotonic()
        if not _image_exists(BASE):
            # With the configuration the real debian:bookworm-slim image carries.
            _podman("import", "--change", f"ENV PATH={BASE_PATH}", "--change", 'CMD ["bash"]', str(_base_rootfs()), BASE)
        base_s = time.monotonic() - started
        previous = {_image_id(AGENT_IMAGE), _image_id(BUILD_STAGE_IMAGE)} - {None}
        _build("--target", "build", "-t", BUILD_STAGE_IMAGE)
        _build("-t", AGENT_IMAGE)  # the build stage from the layer cache
        # A changed package makes new images; the ones they replace (with their intermediate layers)
        # would otherwise pile up on a machine that runs the suite again and again.
        for stale in previous - {_image_id(AGENT_IMAGE), _image_id(BUILD_STAGE_IMAGE)}:
            subprocess.run(["podman", "rmi", stale], capture_output=True)
        (inspect,) = json.loads(_podman("image", "inspect", AGENT_IMAGE).stdout)
        return {"image": AGENT_IMAGE, "size_bytes": inspect["Size"], "base_seconds": round(base_s, 1),
                "build_seconds": round(time.monotonic() - started - base_s, 1)}


def _build(*tag_args: str) -> None:
    args = ["build", "--isolation=chroot", "-f", "docker/Dockerfile", "--build-arg", f"DEBIAN_IMAGE={BASE}", *tag_args]
    if _custom_ca():
        args += ["-v", f"{HOST_CA_BUNDLE}:/run/build-ca.crt:ro", "--build-arg", "PIP_CERT=/run/build-ca.crt"]
    result = subprocess.run(["podman", *args, "."], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"podman build failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


class ImageRoot:
    """The image's file system, writable, as a container's would be (podman create + mount): the
    entrypoint and agent run from it with chroot, since running the container fails here."""

    def __init__(self, image: str):
        self.container = _podman("create", image).stdout.strip()
        self.path = Path(_podman("mount", self.container).stdout.strip())

    def close(self) -> None:
        subprocess.run(["podman", "umount", self.container], capture_output=True)
        subprocess.run(["podman", "rm", "-f", self.container], capture_output=True)
