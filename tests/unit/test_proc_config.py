"""The per-process config the one BPF program reads (struct proc_config): the g window and its
fields from every Go layout the agent knows, the flags, and a layout it cannot serve refused."""

import dataclasses

import pytest

from otel_goroutines import goruntime
from otel_goroutines.errors import UnsupportedTarget
from otel_goroutines.goruntime import LabelSupport
from otel_goroutines.gosdk import SdkSupport
from otel_goroutines.kernel_records import G_WINDOW, ProcFlag
from otel_goroutines.probes import process_config

TABLE = goruntime._layout_tables()


def _support(key: str) -> goruntime.RuntimeSupport:
    structs = TABLE[key]["structs"]
    offsets = {f"{s.split('.')[1]}_{f}": v for s, fields in structs.items() for f, v in fields.items()}
    return goruntime.RuntimeSupport(goruntime.GoVersion.parse(key), goruntime.ARCHES["amd64"], offsets, "table", (), (), (), None)


@pytest.mark.parametrize("key", sorted(TABLE))
def test_every_known_layout_fits_the_window_and_names_each_field(key):
    support = _support(key)
    cfg = process_config(support, None, None, False)
    g = {name[2:]: value for name, value in support.offsets.items() if name.startswith("g_")}
    sizes = {"atomicstatus": 4, "goid": 8, "waitreason": 1, "gopc": 8, "startpc": 8, "parentGoid": 8}
    for field, rel in (("goid", "g_goid"), ("atomicstatus", "g_status"), ("waitreason", "g_waitreason"),
                       ("gopc", "g_gopc"), ("startpc", "g_startpc"), ("parentGoid", "g_parentgoid")):
        if field not in g:
            continue
        assert cfg["g_start"] + cfg[rel] == g[field], (key, field)
        assert cfg[rel] + sizes[field] <= cfg["g_all_size"] <= G_WINDOW
        if field in ("goid", "atomicstatus", "waitreason"):
            assert cfg[rel] + sizes[field] <= cfg["g_lo_size"]
    assert bool(cfg["flags"] & ProcFlag.CFG_PARENT_GOID) == ("parentGoid" in g)
    assert (cfg["off_g_goid"], cfg["off_g_m"], cfg["off_m_curg"]) == (g["goid"], g["m"], support.offsets["m_curg"])


def test_go_1_17_reads_the_creator_through_m_and_1_23_from_parent_goid():
    old, new = process_config(_support("go1.17"), None, None, False), process_config(_support("go1.23"), None, None, True)
    assert (old["g_start"], old["g_lo_size"], old["g_all_size"]) == (144, 33, 176)
    assert old["flags"] == 0
    assert new["flags"] == ProcFlag.CFG_PARENT_GOID | ProcFlag.CFG_STATES_COVER_LIFECYCLE
    assert (new["g_start"], new["g_parentgoid"]) == (152, 280 - 152)


def test_sdk_labels_and_allocation_facts_go_into_the_config():
    sdk = SdkSupport("v1.47.0", {"OFF_RSPAN_SC": 192, "OFF_NRSPAN_SC": 8, "OFF_SC_TRACEID": 0, "OFF_SC_SPANID": 16,
                                 "OFF_SC_FLAGS": 24}, "DWARF", ())
    cfg = process_config(_support("go1.26"), sdk, LabelSupport(360, "slice", "DWARF"), False)
    assert cfg["flags"] & ProcFlag.CFG_APP_SPANS and cfg["flags"] & ProcFlag.CFG_LABELS_SLICE
    assert not cfg["flags"] & ProcFlag.CFG_LABELS_MAP and not cfg["flags"] & ProcFlag.CFG_MEMPROFILERATE
    assert (cfg["off_rspan_sc"], cfg["off_sc_spanid"], cfg["off_g_labels"]) == (192, 16, 360)
    assert process_config(_support("go1.22"), None, LabelSupport(352, "map", "DWARF"), False)["flags"] & ProcFlag.CFG_LABELS_MAP


def test_a_layout_wider_than_the_window_is_refused_in_one_line():
    support = _support("go1.26")
    wide = dataclasses.replace(support, offsets={**support.offsets, "g_startpc": support.offsets["g_goid"] + G_WINDOW})
    with pytest.raises(UnsupportedTarget, match="span more than"):
        process_config(wide, None, None, False)


def test_records_are_queued_by_process_in_their_order():
    import numpy as np
    from otel_goroutines.kernel_records import TRANSITION_EVENT_DTYPE, EventKind
    from otel_goroutines.probes import queue_by_process
    records = np.zeros(6, TRANSITION_EVENT_DTYPE)
    records["tgid"], records["goid"] = [7, 8, 7, 9, 8, 7], [1, 1, 2, 1, 2, 3]  # goids repeat across processes
    queues = {7: {}, 8: {}}
    queue_by_process(queues, EventKind.EV_TRANSITION, records)
    queue_by_process(queues, EventKind.EV_TRANSITION, records[:1])
    assert [q["goid"].tolist() for q in queues[7][EventKind.EV_TRANSITION]] == [[1, 2, 3], [1]]
    assert [q["goid"].tolist() for q in queues[8][EventKind.EV_TRANSITION]] == [[1, 2]]
    assert 9 not in queues  # not traced: dropped
