"""The traced process: launched by the agent (held before exec until probes are in place) or attached to."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess

from .errors import AgentError


class Target:
    def __init__(self, pid: int, exe_path: str):
        self.pid = pid
        self.exe_path = exe_path  # the path probes attach to and the binary is read from
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise AgentError(f"no process with PID {pid}") from None
        self._poller = select.poll()
        self._poller.register(self._pidfd, select.POLLIN)

    def start(self) -> None:
        """Let the program run (a no-op for a process that already runs)."""

    def environment(self) -> dict[str, str]:
        """The process's environment as it was given at its exec (/proc/PID/environ); OSError if unreadable."""
        with open(f"/proc/{self.pid}/environ", "rb") as f:
            entries = f.read().split(b"\0")
        pairs = (entry.decode("utf-8", "replace").partition("=") for entry in entries if b"=" in entry)
        return {name: value for name, _, value in pairs}

    def has_exited(self) -> bool:
        return bool(self._poller.poll(0))

    def exit_status(self) -> int:
        return 0

    def signal(self, signum: int) -> None:
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        os.close(self._pidfd)


class AttachedTarget(Target):
    @classmethod
    def from_pid(cls, pid: int) -> "AttachedTarget":
        if pid <= 0:
            raise AgentError(f"invalid PID {pid}")
        if not os.path.exists(f"/proc/{pid}"):
            raise AgentError(f"no process with PID {pid}")
        if pid == os.getpid():
            raise AgentError("the agent cannot trace itself")
        exe = f"/proc/{pid}/exe"  # opens the real binary even from another mount namespace
        try:
            os.stat(exe)
        except PermissionError:
            raise AgentError(f"not allowed to read {exe}; run as root") from None
        except OSError:
            raise AgentError(f"process {pid} has no executable (a kernel thread, or exiting)") from None
        return cls(pid, exe)


class LaunchedTarget(Target):
    """A child held in a shell that waits on a pipe, then execs the program under the same PID,
    so probes attached to the PID are in place before the program's first instruction."""

    # Exits without running the program if the agent dies before releasing it.
    _HOLD = 'read _ <&3 || exit 125; exec 3<&-; exec "$0" "$@"'

    def __init__(self, argv: list[str]):
        program = argv[0]
        path = shutil.which(program) if "/" not in program else program
        if not path or not os.path.isfile(path):
            raise AgentError(f"{program}: program not found")
        if not os.access(path, os.X_OK):
            raise AgentError(f"{path}: not executable")
        path = os.path.abspath(path)
        read_end, self._release = os.pipe()
        self._proc = subprocess.Popen(["/bin/sh", "-c", self._HOLD, path, *argv[1:]], pass_fds=(read_end,))
        os.close(read_end)
        super().__init__(self._proc.pid, path)

    def start(self) -> None:
        os.write(self._release, b"go\n")
        os.close(self._release)
        self._release = -1

    def exit_status(self) -> int:
        code = self._proc.wait()
        return 128 - code if code < 0 else code  # killed by a signal: shell convention 128+N

    def close(self) -> None:
        if self._release != -1:  # never started: make sure the held shell goes away
            os.close(self._release)
            self._release = -1
            self._proc.wait()
        super().close()


FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
