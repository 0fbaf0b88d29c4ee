"""watch's process discovery and health file, without probes."""

import os
import subprocess
import time

from otel_goroutines.watch import HealthFile, Process, Selector, check_health, go_version_of, read_process


def _proc(exe: str, pid: int = 42) -> Process:
    return Process(pid, 1, exe, (1, 2))


def test_selector_matches_names_paths_and_the_pid_file():
    assert Selector().everything and Selector().matches(_proc("/anything"), None)
    by_name = Selector(exe_names=("api-*",))
    assert by_name.matches(_proc("/app/api-server"), None)
    assert not by_name.matches(_proc("/app/worker"), None)
    assert not by_name.matches(_proc("/api-x/worker"), None)  # the file name, not the directory
    by_path = Selector(exe_paths=("/app/*",))
    assert by_path.matches(_proc("/app/worker"), None) and not by_path.matches(_proc("/usr/bin/worker"), None)
    by_file = Selector(pid_file="/run/app.pid")
    assert by_file.matches(_proc("/x", pid=7), 7) and not by_file.matches(_proc("/x", pid=8), 7)
    assert not by_file.matches(_proc("/x", pid=7), None)
    assert Selector(("a",), ("/b",), "/p").describe() == "executable name 'a' or executable path '/b' or the PID in /p"


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
