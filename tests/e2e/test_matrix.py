"""The compatibility matrix: the tree fixture built by every Go toolchain here (scripts/go_toolchains.py),
in every build mode, traced by the real agent; every cell must give the same span tree.

Toolchains are installed once under .cache/toolchains and binaries cached under .cache/test-binaries,
so a second run fetches and builds nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import AGENT, ROOT, build_program, by_goid, run_agent, site_line, spans_from_otlp_json

sys.path.insert(0, str(ROOT / "scripts"))
import go_toolchains  # noqa: E402

pytestmark = pytest.mark.ebpf

TOOLCHAINS = list(go_toolchains.RELEASES)
# mode -> (go build flags, CGO_ENABLED). cgo: linked by gcc with runtime/cgo, as any cgo program is.
MODES = {
    "default": ((), False),
    "stripped": (("-ldflags=-s -w",), False),
    "pie": (("-buildmode=pie",), False),
    "pie-stripped": (("-buildmode=pie", "-ldflags=-s -w"), False),
    "cgo": (("-ldflags=-linkmode=external",), True),
    "trimpath": (("-trimpath",), False),
}
CELLS = [(go, mode) for go in TOOLCHAINS for mode in MODES]
TREES: dict[tuple[str, str], list] = {}  # the span tree each cell gave, compared at the end


def _minor(go: str) -> int:
    return int(go.split(".")[1])


@pytest.fixture(scope="module")
def toolchains():
    return {minor: go_toolchains.toolchain(minor) for minor in TOOLCHAINS}


def _binary(toolchains, name: str, go: str, mode: str) -> Path:
    flags, cgo = MODES[mode]
    return build_program(name, go=str(toolchains[go]), flags=flags, cgo=cgo)


def _expected_wait(g: dict, go: str) -> str:
    # sync.Mutex.Lock got its own wait reason in Go 1.20; before, a blocked Lock waits in "semacquire".
    if g.get("waits_on") == "sync.Mutex.Lock" and _minor(go) < 20:
        return "semacquire"
    return g["waits_on"]


def _inspect(path: Path, go: str, mode: str) -> str:
    run = run_agent(["inspect", str(path)])
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert f"Go version:      go{go}." in out
    stripped = "stripped" in mode
    build = next(line for line in out.splitlines() if line.startswith("build mode:"))
    assert build.split(":", 1)[1].strip() == ", ".join(
        ["pie (PIE)" if "pie" in mode else "exe"] + ["cgo"] * (mode == "cgo") + ["trimpath"] * (mode == "trimpath")
        + (["stripped", "no DWARF"] if stripped else ["symbols", "DWARF"]))
    assert f"struct offsets:  from {f'generated table for go{go}' if stripped else 'DWARF'}" in out
    for handler in ("on_goroutine_created", "on_goroutine_exit", "on_casgstatus"):
        assert handler in out
    assert ("runtime.gdestroy" if _minor(go) >= 22 else "runtime.goexit0") in out
    return out


@pytest.mark.parametrize("go,mode", CELLS, ids=[f"go{go}-{mode}" for go, mode in CELLS])
def test_same_tree_in_every_cell(toolchains, go, mode, tmp_path):
    binary = _binary(toolchains, "tree", go, mode)
    _inspect(binary, go, mode)
    manifest_path, spans_path = tmp_path / "manifest.json", tmp_path / "spans.jsonl"
    run = run_agent(["run", "--exporter", "file", "--output", str(spans_path), "--quiet", "--",
                     str(binary), str(manifest_path)])
    assert run.returncode == 0, run.stderr
    manifest = json.loads(manifest_path.read_text())
    spans = by_goid(spans_from_otlp_json(spans_path))

    main = spans[manifest["main_goid"]]
    assert main.name == "runtime.main" and main.parent_span_id == ""
    assert main.resource["process.runtime.version"].startswith(f"go{go}.")
    tree = []
    for g in manifest["goroutines"]:
        span = spans[g["goid"]]
        parent = spans[g["parent"]]
        attrs = span.attributes
        assert span.name == g["func"] and attrs["code.function.name"] == g["func"]
        assert attrs["go.goroutine.parent_id"] == g["parent"] and span.parent_span_id == parent.span_id
        assert attrs["code.file.path"].endswith("tree/main.go")
        assert attrs["code.line.number"] == site_line("tree", g["site"])
        assert attrs["go.goroutine.created_by"] == ("main.worker" if g["func"] == "main.leaf" else "main.main")
        reasons = {a.get("go.goroutine.wait_reason") for name, _, a in span.events if name == "waiting"}
        if g.get("waits_on"):
            assert _expected_wait(g, go) in reasons, (g, reasons)
        if g["func"] == "main.worker":
            assert "sleep" in reasons
        alive = g["func"] == "main.stuck"
        assert attrs["go.goroutine.end_reason"] == ("process_exited" if alive else "exited")
        assert attrs.get("go.goroutine.alive_at_end", False) is alive
        tree.append((span.name, parent.name, attrs["code.line.number"], g.get("waits_on"), alive))
    TREES[go, mode] = sorted(tree)


def test_every_cell_gave_the_same_tree():
    if len(TREES) < 2:
        pytest.skip("needs at least two cells of this run")
    (first_cell, first), *rest = TREES.items()
    for cell, tree in rest:
        assert tree == first, f"{cell} differs from {first_cell}"


def test_layout_table_is_what_the_toolchains_give(toolchains):
    # The shipped table must be re-generable: scripts/gen_layouts.py --check rebuilds it from the toolchains.
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_layouts.py"), "--check"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


@pytest.mark.parametrize("go,mode", [(TOOLCHAINS[-1], "default"), (TOOLCHAINS[0], "pie-stripped")],
                         ids=lambda v: v)
def test_attach_to_another_mount_namespace(toolchains, go, mode, tmp_path):
    """The binary lives in a tmpfs mounted only in the target's own mount namespace: the agent
    reaches it through /proc/PID/exe only."""
    if not shutil.which("unshare"):
        pytest.skip("unshare (util-linux) is not installed")
    binary = _binary(toolchains, "ticker", go, mode)
    private = tmp_path / "private"
    private.mkdir()
    manifest = tmp_path / "ticker.json"
    script = f'mount -t tmpfs tmpfs "{private}" && cp "{binary}" "{private}/ticker" && exec "{private}/ticker" "{manifest}" 30s'
    holder = subprocess.Popen(["unshare", "--mount", "--pid", "--fork", "--kill-child", "sh", "-c", script])
    try:
        deadline = time.monotonic() + 10
        target = None
        while time.monotonic() < deadline and target is None:
            kids = _children(holder.pid)
            if kids and os.path.basename(os.readlink(f"/proc/{kids[0]}/exe")) == "ticker":
                target = kids[0]
            time.sleep(0.05)
        assert target is not None, "the namespaced ticker did not start"
        assert not (private / "ticker").exists()  # not visible from here
        inspect = run_agent(["inspect", "--pid", str(target)])
        assert inspect.returncode == 0 and f"go{go}." in inspect.stdout, inspect.stderr
        # The executable's path as the target sees it, not the /proc link it is read through.
        assert f"binary:          {private}/ticker (PID {target}, read through /proc/{target}/exe)" in inspect.stdout

        spans_path = tmp_path / "spans.jsonl"
        agent = subprocess.Popen(AGENT + ["attach", "--exporter", "file", "--output", str(spans_path), "-q", str(target)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Stop once ticks created after the attach have come through (the agent's start-up takes a while).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and agent.poll() is None and \
                (not spans_path.exists() or spans_path.read_text().count('"name":"main.tick"') < 30):
            time.sleep(0.2)
        agent.send_signal(signal.SIGINT)
        _, err = agent.communicate(timeout=30)
        assert agent.returncode == 0, err
    finally:
        holder.send_signal(signal.SIGTERM)  # unshare --kill-child then kills the ticker
        try:
            holder.wait(10)
        except subprocess.TimeoutExpired:
            holder.kill()
    spans = spans_from_otlp_json(spans_path)
    ticks = [s for s in spans if s.name == "main.tick"]
    assert len(ticks) >= 30, err
    assert all(s.attributes["code.line.number"] == site_line("ticker", "tick") for s in ticks)
    tocks = [s for s in spans if s.name == "main.tock"]
    assert tocks and all(s.attributes["go.goroutine.created_by"] == "main.tick" for s in tocks)


INLINED_CELLS = [(go, mode) for go in (TOOLCHAINS[0], TOOLCHAINS[-1]) for mode in ("default", "pie-stripped")]


@pytest.mark.parametrize("go,mode", INLINED_CELLS, ids=[f"go{go}-{mode}" for go, mode in INLINED_CELLS])
def test_inlined_go_statement_named_after_its_function(toolchains, go, mode, tmp_path):
    """`go handle(...)` whose handle the compiler inlined into the go statement's wrapper (Go 1.22+),
    handle calling record first: the span says main.handle, as the runtime's own traceback does."""
    binary = _binary(toolchains, "inlined", go, mode)
    manifest_path, spans_path = tmp_path / "manifest.json", tmp_path / "spans.jsonl"
    run = run_agent(["run", "--exporter", "file", "--output", str(spans_path), "--quiet", "--",
                     str(binary), str(manifest_path)])
    assert run.returncode == 0, run.stderr
    manifest = json.loads(manifest_path.read_text())
    assert manifest["traceback"][-2] == "main.handle"  # the frame under runtime.goexit: what the go statement started
    spans = by_goid(spans_from_otlp_json(spans_path))
    for g in manifest["goroutines"]:
        assert spans[g["goid"]].name == "main.handle"
        assert spans[g["goid"]].attributes["code.line.number"] == site_line("inlined", "handle")
    names = [s.name for s in spans.values()]
    for func in ("main.handle", "main.holder", "main.drain"):
        assert names.count(func) == manifest["each"], names
    # A literal capturing a variable, started with arguments: its wrapper calls it through the closure value.
    (literal,) = [s for s in spans.values() if s.name == manifest["literal_traceback"][-2] == "main.main.func1"]
    assert literal.attributes["code.line.number"] == site_line("inlined", "literal")
    assert not {"main.record", "sync.(*WaitGroup).Add"} & set(names) and not [n for n in names if ".gowrap" in n]
