import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import OtlpHttpReceiver, Rotel, build_program  # noqa: E402

# Skips that are expected, each with the reason it is allowed. Any other skip is a failure: a
# prerequisite that `make setup` installs (a toolchain, util-linux, tracefs, kernel headers) must
# fail the test that needs it when it is missing, never let it pass in silence.
ALLOWED_SKIPS = {
    r"^needs at least two cells of this run$":
        "test_matrix compares the trees of the cells that ran; a selection (-k) of one cell has nothing to compare",
}


def _allowed(reason: str) -> bool:
    return any(re.search(pattern, reason) for pattern in ALLOWED_SKIPS)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


_skips = {"allowed": [], "refused": []}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if _allowed(reason):
            _skips["allowed"].append((report.nodeid, reason))
        else:  # an unexplained skip fails the test, with the skip's reason
            _skips["refused"].append((report.nodeid, reason))
            report.outcome = "failed"
            report.longrepr = (f"skipped without an allowed reason (tests/conftest.py ALLOWED_SKIPS): {reason}\n"
                               "a prerequisite that `make setup` installs is missing, or the skip needs a reason in ALLOWED_SKIPS")


def pytest_collectreport(report):
    # A whole module skipped at collection (pytest.importorskip, a module-level skip): counted, and
    # turned into a failing exit status at the end unless allowed.
    if report.skipped:
        reason = _skip_reason(report)
        _skips["allowed" if _allowed(reason) else "refused"].append((report.nodeid, reason))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    allowed, refused = _skips["allowed"], _skips["refused"]
    terminalreporter.write_line(f"skips: {len(allowed) + len(refused)} ({len(allowed)} allowed, "
                                f"{len(refused)} without an allowed reason, counted as failures)")
    for nodeid, reason in allowed:
        terminalreporter.write_line(f"  allowed skip {nodeid}: {reason}")
    for nodeid, reason in refused:
        terminalreporter.write_line(f"  REFUSED skip {nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if _skips["refused"] and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def receiver():
    r = OtlpHttpReceiver()
    yield r
    r.close()


@pytest.fixture(scope="session")
def rotel(receiver, tmp_path_factory):
    collector = Rotel(receiver.port, tmp_path_factory.mktemp("rotel") / "rotel.log")
    yield collector
    collector.close()


@pytest.fixture(scope="session")
def programs():
    return {name: build_program(name) for name in ("tree", "panicker", "ticker")}
