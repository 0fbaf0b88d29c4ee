"""The settings the CLI parses: built once, frozen, never rewritten by what runs on them."""

import dataclasses
import logging

import pytest

from helpers import build_program, parsed_options as _parsed
from otel_goroutines import cli
from otel_goroutines.agent import Session
from otel_goroutines.allocs import AllocMode
from otel_goroutines.analysis import AnalysisCache, BinaryAnalysis, analyse
from otel_goroutines.watch import Process, Selector, Traced, Watcher, flush_share


def _settings_objects(obj):
    yield obj
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _settings_objects(value)


def test_every_settings_object_the_cli_builds_is_frozen():
    options = _parsed()
    objects = list(_settings_objects(options))
    assert {type(o).__name__ for o in objects} >= {"AgentOptions", "ExportSettings", "ProbeSettings", "LongLivedSettings",
                                                    "GroupSettings"}
    for obj in objects:
        name = dataclasses.fields(obj)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, getattr(obj, name))


def test_probe_placement_is_a_hidden_option_parsed_into_the_settings():
    assert _parsed().probes.placement == "cheap"
    assert _parsed("--probe-placement", "entry").probes.placement == "entry"
    assert "--probe-placement" not in cli.run.get_help(cli.run.make_context("run", ["--", "prog"]))


class _Target:
    def __init__(self, exe_path: str):
        self.exe_path = exe_path
        self.pid = 1


class _Analyses:
    """An analysis cache that finds no heap-allocation probe points in the binary."""

    def __init__(self, exe: str):
        found = analyse(exe)
        self.without_allocs = BinaryAnalysis(found.binary, dataclasses.replace(found.support, allocs=None), found.sdk)
        self.placements = []

    def get(self, exe_path: str, placement: str) -> BinaryAnalysis:
        self.placements.append(placement)
        return self.without_allocs


def test_a_binary_without_alloc_points_turns_allocs_off_for_its_session_only(caplog):
    exe = str(build_program("ticker"))
    options = _parsed("--allocs", "sampled", "--probe-placement", "entry")
    parsed = dataclasses.replace(options)
    analyses = _Analyses(exe)
    with caplog.at_level(logging.WARNING, logger="otel_goroutines"):
        without = Session(_Target(exe), options, analyses=analyses)
    assert analyses.placements == ["entry"]  # the cache is asked for the placement the options say
    assert without.probe_settings.allocs is AllocMode.OFF and without.probes.settings.allocs is AllocMode.OFF
    assert "no heap-allocation probe points" in caplog.text
    without.stop(30.0)
    assert without.flush_timeout_s == 10.0  # never longer than --flush-timeout
    without.stop(2.5)
    assert without.flush_timeout_s == 2.5 and options.export.flush_timeout_s == 10.0
    assert options == parsed and options.probes is parsed.probes and options.probes.allocs is AllocMode.SAMPLED
    # The next process given the same options (as `watch` does) still gets what was asked for.
    with_allocs = Session(_Target(exe), options)
    assert with_allocs.probe_settings.allocs is AllocMode.SAMPLED and with_allocs.probes.settings.allocs is AllocMode.SAMPLED


def test_flush_share_splits_what_is_left_of_the_shutdown_timeout():
    assert flush_share(20.0, 4) == 4.0
    assert flush_share(20.0, 1) == 19.0
    assert flush_share(1.0, 3) == 0.2  # never less: each session gets a chance to flush


class _StoppedSession:
    def __init__(self):
        self.flush_timeouts = []

    def stop(self, flush_timeout_s=None):
        self.flush_timeouts.append(flush_timeout_s)


class _Closed:
    def close(self):
        pass


def _ended():
    return
    yield


def test_watch_shutdown_gives_each_session_its_share_and_leaves_the_options_alone():
    options = _parsed("--flush-timeout", "10")
    watcher = Watcher(Selector(), options, shutdown_timeout_s=12.0)
    sessions = {pid: _StoppedSession() for pid in (101, 102, 103)}
    for pid, session in sessions.items():
        watcher.traced[pid] = Traced(Process(pid, 1, "/x", (pid,)), _Closed(), session, _ended())
    watcher._shutdown()
    shares = [s.flush_timeouts for s in sessions.values()]
    assert all(len(s) == 1 for s in shares)
    assert shares[0][0] == pytest.approx(3.0, abs=0.1)  # 12 s among 3, less a second to detach
    assert shares[1][0] == pytest.approx(5.0, abs=0.1)  # the first one took no time: 12 s among 2
    assert shares[2][0] == pytest.approx(11.0, abs=0.1)
    assert options.export.flush_timeout_s == 10.0 and not watcher.traced


def test_the_analysis_cache_keys_on_the_probe_placement():
    exe = str(build_program("ticker"))
    cache = AnalysisCache()
    cheap, entry = cache.get(exe, "cheap"), cache.get(exe, "entry")
    assert cache.get(exe, "cheap") is cheap and cache.get(exe, "entry") is entry
    entries = {p.function: cheap.binary.function(p.function).entry for p in cheap.support.lifecycle_probes}
    assert any(p.address != entries[p.function] for p in cheap.support.lifecycle_probes)
    assert {p.address for p in entry.support.lifecycle_probes} == set(entries.values())  # each function's first instruction
    assert not entry.support.states_cover_lifecycle
