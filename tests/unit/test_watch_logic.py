"""watch's process discovery and health file, without probes."""

import os
import subprocess
import time

from otel_goroutines.watch import HealthFile, Process, Selector, check_health, go_version_of, read_process


def _proc(exe: str, pid: int = 42) -> Process:
    return Process(pid, 1, exe, (1, 2))


def test_selector_includes_names_paths_and_the_pid_file():
    assert Selector().everything and Selector().includes(_proc("/anything"), None)
    by_name = Selector(exe_names=("api-*",))
    assert by_name.includes(_proc("/app/api-server"), None)
    assert not by_name.includes(_proc("/app/worker"), None)
    assert not by_name.includes(_proc("/api-x/worker"), None)  # the file name, not the directory
    by_path = Selector(exe_paths=("/app/*",))
    assert by_path.includes(_proc("/app/worker"), None) and not by_path.includes(_proc("/usr/bin/worker"), None)
    by_file = Selector(pid_file="/run/app.pid")
    assert by_file.includes(_proc("/x", pid=7), 7) and not by_file.includes(_proc("/x", pid=8), 7)
    assert not by_file.includes(_proc("/x", pid=7), None)
    assert Selector(("a",), ("/b",), "/p").describe() == "executable name 'a' or executable path '/b' or the PID in /p"


def test_selector_exclusions_name_what_they_leave_out():
    node_wide = Selector(exclude_names=("otelcol*", "kubelet"), exclude_paths=("/usr/bin/*",))
    assert node_wide.everything  # exclusions alone still mean every other Go process
    assert node_wide.excluded_by(_proc("/otelcol-contrib")) == "executable name 'otelcol*'"
    assert node_wide.excluded_by(_proc("/usr/local/bin/kubelet")) == "executable name 'kubelet'"
    assert node_wide.excluded_by(_proc("/usr/bin/containerd")) == "executable path '/usr/bin/*'"
    assert node_wide.excluded_by(_proc("/app/kubelet-helper")) is None
    assert node_wide.excluded_by(_proc("/usr/local/bin/api")) is None
    assert node_wide.describe() == ("every Go process, except executable name 'otelcol*' or executable name 'kubelet' "
                                    "or executable path '/usr/bin/*'")
    by_name = Selector(exe_names=("api-*",), exclude_names=("api-debug",))
    assert by_name.includes(_proc("/app/api-debug"), None) and by_name.excluded_by(_proc("/app/api-debug"))
    assert by_name.describe() == "executable name 'api-*', except executable name 'api-debug'"


def test_read_process_tells_a_reused_pid_and_an_exec_apart():
    me = read_process(os.getpid())
    assert me.exe == os.path.realpath("/proc/self/exe")
    assert me.key == read_process(os.getpid()).key
    assert read_process(999_999_999) is None
    assert read_process(2) is None or read_process(2).exe  # kthreadd has no executable: None


def test_a_non_go_program_is_named_as_such():
    sleeper = subprocess.Popen(["sleep", "5"])
    try:
        try:
            go_version_of(sleeper.pid)
        except Exception as exc:
            assert "not a Go program" in str(exc)
        else:
            raise AssertionError("sleep taken for a Go program")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_health_file(tmp_path):
    path = tmp_path / "run" / "health.json"
    assert "not running" in check_health(str(path), 30, False)
    health = HealthFile(str(path))
    state = {"updated": time.time(), "state": "running", "selector": "x", "targets": []}
    health.write(state)
    assert check_health(str(path), 30, False) is None
    assert "traces no process yet" in check_health(str(path), 30, True)
    health.write(dict(state, targets=[{"pid": 1, "exe": "/x"}]))
    assert check_health(str(path), 30, True) is None
    health.write(dict(state, updated=time.time() - 100))
    assert "stuck or gone" in check_health(str(path), 30, False)
    health.write(dict(state, state="stopping"))
    assert "stopping" in check_health(str(path), 30, False)
    path.write_text("{")
    assert "unreadable" in check_health(str(path), 30, False)
    health.remove()
    assert not path.exists()
