"""The agent image, built for real (podman build --isolation=chroot, tests/image_build.py), then run
as far as this machine allows: running its container fails here (crun: cgroups in hybrid mode;
runc: rlimits), so its own entrypoint and agent run from its file system with chroot, in a mount
namespace of their own, as the sidecar test runs docker/entrypoint.sh."""

import json
import os
import shutil
import subprocess

import pytest

from helpers import spans_from_otlp_json
from image_build import ImageRoot, build_agent_image

pytestmark = pytest.mark.ebpf


@pytest.fixture(scope="module")
def agent_image():
    image = build_agent_image()
    print(f"\nagent image: {image['size_bytes'] / 1e6:.0f} MB; base {image['base_seconds']} s, build {image['build_seconds']} s")
    return image


@pytest.fixture
def image_root(agent_image):
    root = ImageRoot(agent_image["image"])
    yield root
    root.close()


def test_image_holds_the_agent_bcc_and_headers_but_no_compiler(image_root):
    root = image_root.path
    assert (root / "opt/otel-goroutines/venv/bin/otel-goroutines").exists()
    assert (root / "usr/lib/python3/dist-packages/bcc/__init__.py").exists()
    (arch_headers,) = (root / "usr/src").glob("linux-headers-*-amd64")
    assert (root / "usr/src" / arch_headers.name.replace("-amd64", "-common") / "include/linux/kconfig.h").exists()
    assert not list((root / "usr/bin").glob("gcc*")) and not list((root / "usr/bin").glob("x86_64-linux-gnu-gcc*"))
    assert not (root / "usr/include/python3.11/Python.h").exists()  # python3-dev stayed in the build stage


def test_the_images_entrypoint_runs_its_agent(agent_image, image_root, programs):
    """The image's ENTRYPOINT with its environment: it finds no kernel headers from the host (an empty
    /lib/modules, as the manifests mount), links the image's own, and the agent compiles its probes
    with the image's bcc and traces a Go program."""
    root = image_root.path
    config = json.loads(subprocess.run(["podman", "image", "inspect", agent_image["image"]], check=True,
                                       capture_output=True, text=True).stdout)[0]["Config"]
    shutil.copy(programs["tree"], root / "tmp" / "tree")
    (root / "lib/modules").mkdir(parents=True, exist_ok=True)
    script = (f'for d in proc sys dev; do mount --rbind /$d "{root}/$d"; done '
              f'&& mount -t tmpfs tmpfs "{root}/lib/modules" && exec chroot "{root}" env -i "$@"')
    argv = [*config["Env"], *config["Entrypoint"], "run", "--exporter", "file", "--output", "/tmp/spans.jsonl", "--quiet", "--",
            "/tmp/tree", "/tmp/manifest.json"]
    result = subprocess.run(["unshare", "--mount", "--", "sh", "-c", script, "sh", *argv], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert f"no kernel headers for {os.uname().release} from the host; using linux-headers-" in result.stderr
    manifest = json.loads((root / "tmp/manifest.json").read_text())
    spans = spans_from_otlp_json(root / "tmp/spans.jsonl")
    assert {g["goid"] for g in manifest["goroutines"]} <= {s.attributes["go.goroutine.id"] for s in spans}
