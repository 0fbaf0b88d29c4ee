"""The traced program's own OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES (agent.target_otel_resource),
read from /proc/PID/environ of a real process."""

import logging
import os
import subprocess
import sys
from pathlib import Path

from helpers import poll
from otel_goroutines.agent import target_otel_resource
from otel_goroutines.target import AttachedTarget


def _resource_of(env: dict):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], env=env)
    try:
        # Until its exec, the child has this process's environment.
        assert poll(lambda: b"time.sleep" in Path(f"/proc/{proc.pid}/cmdline").read_bytes(), 30)
        target = AttachedTarget.from_pid(proc.pid)
        try:
            return target_otel_resource(target).attributes
        finally:
            target.close()
    finally:
        proc.kill()
        proc.wait()


def test_service_and_attributes_parsed_as_the_sdk_does(caplog):
    caplog.set_level(logging.WARNING)
    attrs = _resource_of({"OTEL_SERVICE_NAME": "checkout", "OTEL_RESOURCE_ATTRIBUTES":
                          " team = pay%20ments ,broken, deployment.environment=prod,=x,service.name=overridden"})
    assert dict(attrs) == {"team": "pay ments", "deployment.environment": "prod", "service.name": "checkout"}
    ignored = [r.getMessage() for r in caplog.records]
    assert len(ignored) == 2 and "'broken'" in ignored[0] and "'=x'" in ignored[1]


def test_nothing_set_gives_nothing():
    assert dict(_resource_of({"PATH": os.environ.get("PATH", "")})) == {}
