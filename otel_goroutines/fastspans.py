"""Goroutine records in columns -> encoded spans, a batch at a time.

The reference path builds a GoroutineSpan per record (SpanBuilder.build), then encodes it
(SpanEncoder.span): ~10 us a goroutine in Python, and a per-span template encoder in plain Python
still measured ~4.6 us (FIELD-NOTES 4b), over the agent's budget of 3-5 us a goroutine for
everything. Here the span of every row comes out as the same bytes, from numpy columns:

- ids (splitmix64) and wall-clock times are computed on whole columns with numpy;
- what repeats (name and code.function.name per start pc, created_by/file/line per creation pc,
  event bodies per (to, from, wait reason), the trace/end reason attributes) is encoded once per
  process by the reference SpanEncoder and then only indexed;
- the C extension _spanenc lays each span out from those columns and pieces: one PyBytes a span.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from . import _spanenc
from .allocs import AllocMode
from .goruntime import N_STATES, STATE_NAMES
from .otlp_wire import _KIND_INTERNAL, SpanEncoder, _field, key_value
from .records import EndReason, TraceReason
from .kernel_records import WakerFlag
from .spans import _RUNNABLE, _TRACE_REASONS, _TRACE_SALT, _WAITING, SpanBuilder
from .wakes import WAKER_LINK, Waker, event_attributes, links_to_keep, wakers

_U64 = np.uint64
_MASK64 = (1 << 64) - 1
_PIECES_MAX = 1 << 16  # interned pieces kept before starting over (a program with endless distinct pcs)
_MISSING = np.iinfo(_U64).max  # _spanenc.lookup: a key not in the table
_STATE_LIMIT = 1 << 16  # states are packed in 16 bits of an event key (runtime states are < 2^13)


class Changes(NamedTuple):
    """State changes of a batch of rows in CSR form: row i's are [offsets[i], offsets[i+1])."""
    offsets: np.ndarray      # int64, n + 1
    time_ns: np.ndarray      # uint64 kernel monotonic clock
    from_state: np.ndarray   # uint32
    to_state: np.ndarray     # uint32
    wait_reason: np.ndarray  # uint32, meaningful when to_state is waiting, and for a wake
    waker: np.ndarray | None = None       # uint32 kernel waker flags of a wake; None: no wakes
    waker_goid: np.ndarray | None = None  # uint64
    waker_root: np.ndarray | None = None  # uint64
    wake_pc: np.ndarray | None = None     # uint64
    waker_start_pc: np.ndarray | None = None  # uint64

    @classmethod
    def none(cls, n: int) -> Changes:
        empty = np.empty(0, np.uint32)
        return cls(np.zeros(n + 1, np.int64), np.empty(0, _U64), empty, empty, empty)

    def with_wakes(self) -> Changes:
        """These changes with the waker columns filled (zeros where None)."""
        m = len(self.time_ns)
        return self._replace(**{name: np.zeros(m, np.uint32 if name == "waker" else _U64) if getattr(self, name) is None
                                else getattr(self, name) for name in ("waker", "waker_goid", "waker_root", "wake_pc", "waker_start_pc")})


def mix64(salt: int, n: np.ndarray) -> np.ndarray:
    """spans.mix64 on a uint64 array: numpy's uint64 arithmetic wraps mod 2^64 as its masks do."""
    z = n.astype(_U64) * _U64(0x9E3779B97F4A7C15) + _U64(salt & _MASK64)
    z = (z ^ (z >> 30)) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> 27)) * _U64(0x94D049BB133111EB)
    z ^= z >> 31
    z[z == 0] = 1
    return z


def _payload(field: bytes) -> bytes:
    """A length-delimited field's payload: what follows its one-byte tag and varint length."""
    i = 1
    while field[i] & 0x80:
        i += 1
    return field[i + 1:]


class _Interned:
    """uint64 keys -> index of their encoding in a list of pieces shared by several of these, each
    key encoded once per process: pcs and state pairs repeat from batch to batch."""

    def __init__(self, pieces: list[bytes], encode: Callable[[int], Sequence[bytes]]):
        self._pieces = pieces
        self._encode = encode  # key -> its consecutive pieces
        self._keys = np.empty(0, _U64)
        self._first = np.empty(0, _U64)  # index of each key's first piece

    def __call__(self, keys: np.ndarray) -> np.ndarray:
        keys = np.ascontiguousarray(keys, _U64)
        out = np.empty(len(keys), _U64)
        if _spanenc.lookup(keys, self._keys, self._first, out):
            self._add(np.unique(keys[out == _MISSING]).tolist())
            _spanenc.lookup(keys, self._keys, self._first, out)
        return out

    def _add(self, keys: list[int]) -> None:
        first = []
        for key in keys:
            first.append(len(self._pieces))
            self._pieces.extend(self._encode(key))
        self._keys = np.concatenate([self._keys, np.array(keys, _U64)])
        self._first = np.concatenate([self._first, np.array(first, _U64)])


class BatchSpanEncoder:
    """Encodes a batch of finished goroutines' spans with the builder's settings (salt, clock offset,
    symbols, states_traced, allocs) and the encoder's key and attribute encodings.

    Rows must be the common case: no checkpoints (before=None), no pprof labels, app_flags == 0 (any
    trace_reason, APP_SPAN included, encodes as without an application trace). The caller sends rows
    with checkpoints, labels, application traces or leak flags to the reference path. Values must
    be what a GoroutineRecord could hold: times such that wall clock = kernel time + clock offset is
    in [0, 2^64) (the reference raises otherwise), states below 2^16.
    """

    def __init__(self, builder: SpanBuilder, encoder: SpanEncoder):
        self._builder = builder
        self._encoder = encoder
        self._int_keys = self._int_attribute_keys()
        self._prefixes = tuple(key_value(key, 0)[:-3] for key, _ in self._int_keys)  # without AnyValue{int 0}
        self._skip_zero = bytes(skip for _, skip in self._int_keys)
        self._head_ints = 2  # id and parent id come before code.function.name
        self._link_attrs = self._attrs({"go.goroutine.link": "creator"}, b"\x22")
        self._waker_link_attrs = self._attrs(WAKER_LINK, b"\x22")
        self._waker_id_prefix = key_value("go.goroutine.waker.id", 0)[:-3]
        self._start_over()

    def encode(self, cols: Mapping[str, np.ndarray], end_reason: np.ndarray, changes: Changes) -> list[bytes]:
        """For each row i, SpanEncoder.span(SpanBuilder.build(rec_i)): the ScopeSpans.spans field."""
        if len(self._pieces) > _PIECES_MAX:
            self._start_over()
        rows = self._rows(cols, end_reason)
        changes = changes.with_wakes()
        offsets = np.ascontiguousarray(changes.offsets, np.int64)
        woken = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        code, named = self._wakers(changes, cols["goid"][woken])
        parent = (cols["trace_reason"][woken] == TraceReason.JOINS_PARENT) & (changes.waker_goid == cols["parent_goid"][woken])
        linked, left_out = links_to_keep(woken, changes.waker_goid, named & ~parent & (
            changes.waker & (WakerFlag.WAKER_TRACED | WakerFlag.WAKER_APP_TRACE) != 0), changes.waker & WakerFlag.WAKER_TRACED != 0)
        ints = self._ints(cols, rows.shape[1], np.pad(left_out, (0, rows.shape[1] - len(left_out))))
        link_offsets = np.searchsorted(np.flatnonzero(linked), offsets).astype(np.int64)
        return _spanenc.encode(rows, ints, offsets, self._changes(changes, code, named),
                               tuple(self._pieces), self._prefixes, self._skip_zero, self._head_ints, self._link_attrs,
                               link_offsets, self._wake_links(changes, linked), self._waker_link_attrs, self._waker_id_prefix)

    # --- columns ----------------------------------------------------------------------------
    def _rows(self, cols: Mapping[str, np.ndarray], end_reason: np.ndarray) -> np.ndarray:
        """The ids, times and piece indices of each row, in _spanenc's column order."""
        salt, offset = self._builder.salt, _U64(self._builder.clock_offset_ns & _MASK64)
        reason, ended = cols["trace_reason"], end_reason.astype(_U64)
        if len(reason) and (reason.max() > max(TraceReason) or ended.max() >= len(EndReason)):
            raise ValueError("trace_reason or end_reason out of range")
        rows = np.empty((_spanenc.ROW_COLS, len(reason)), _U64)  # column-major: numpy fills whole columns
        rows[_spanenc.TRACE_HI] = mix64(salt, cols["root_goid"])
        rows[_spanenc.TRACE_LO] = mix64(salt ^ _TRACE_SALT, cols["root_goid"])
        rows[_spanenc.SPAN_ID] = mix64(salt, cols["goid"])
        creator = mix64(salt, cols["parent_goid"])
        rows[_spanenc.PARENT_ID] = np.where(reason == TraceReason.JOINS_PARENT, creator, 0)
        grouped = reason == TraceReason.GROUPED  # under its group's span: span_id_for(root_goid), the trace's high half
        if grouped.any():
            rows[_spanenc.PARENT_ID][grouped] = rows[_spanenc.TRACE_HI][grouped]
        linked = (reason == TraceReason.SPAWNER) | (reason == TraceReason.TRACE_FULL)
        rows[_spanenc.LINK_SPAN] = np.where(linked, creator, 0)
        rows[_spanenc.LINK_HI] = mix64(salt, cols["parent_root_goid"])
        rows[_spanenc.LINK_LO] = mix64(salt ^ _TRACE_SALT, cols["parent_root_goid"])
        rows[_spanenc.START_NS] = cols["create_ns"] + offset
        rows[_spanenc.END_NS] = cols["end_ns"] + offset
        rows[_spanenc.HEAD] = head = self._functions(cols["start_pc"])
        rows[_spanenc.FN] = head + 1
        rows[_spanenc.SITE] = self._sites(cols["go_pc"])
        traced = cols.get("traced_in_full")  # 0: no attribute (no overhead budget), 1: true, 2: false
        traced = np.zeros(len(reason), _U64) if traced is None else np.where(traced, 1, 2).astype(_U64)
        rows[_spanenc.EXISTED] = self._existed + 3 * (cols["flags"] & 1).astype(_U64) + traced
        rows[_spanenc.TAIL] = self._tails + reason * len(EndReason) + ended
        rows[_spanenc.END_BODY] = self._end_bodies + ended
        return rows

    def _int_attribute_keys(self) -> list[tuple[str, bool]]:
        """The integer attributes in the order SpanBuilder._span adds them, and whether zero is left out."""
        keys = [("go.goroutine.id", False), ("go.goroutine.parent_id", False)]
        if self._builder.states_traced:
            keys += [(f"go.goroutine.{STATE_NAMES[state]}_ns", True) for state in range(N_STATES)]
            keys += [("go.goroutine.transitions", False), ("go.goroutine.events_left_out", False)]
        if self._builder.allocs is not AllocMode.OFF:
            keys += [("go.goroutine.alloc.bytes", False), ("go.goroutine.alloc.count", False)]
            if self._builder.allocs is AllocMode.SAMPLED:
                keys.append(("go.goroutine.alloc.samples", False))
        keys.append(("go.goroutine.waker_links_left_out", True))
        return keys

    def _ints(self, cols: Mapping[str, np.ndarray], n: int, links_left_out: np.ndarray) -> np.ndarray:
        ints = np.empty((len(self._int_keys), n), _U64)  # column-major, as rows
        ints[0], ints[1] = cols["goid"], cols["parent_goid"]
        j = 2
        if self._builder.states_traced:
            ints[j:j + N_STATES] = cols["state_ns"].T
            ints[j + N_STATES], ints[j + N_STATES + 1] = cols["transitions"], cols["events_left_out"]
            j += N_STATES + 2
        for name in ("alloc_bytes", "alloc_count", "alloc_samples")[:len(self._int_keys) - 1 - j]:
            ints[j] = cols[name]
            j += 1
        ints[j] = links_left_out
        return ints

    def _wakers(self, changes: Changes, woken_goid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each change's Waker code (NONE where it is not a wake), and where the event names the waker's id."""
        b = self._builder
        is_wake = (changes.from_state == _WAITING) & (changes.to_state == _RUNNABLE) & b.wakers
        return wakers(is_wake, changes.waker, changes.waker_goid, woken_goid, changes.wake_pc, changes.waker_start_pc,
                      changes.wait_reason, b.function_name, b.wait_reason)

    def _wake_links(self, changes: Changes, linked: np.ndarray) -> np.ndarray:
        """The waker links' trace id halves and span ids, in change order."""
        salt, root, goid = self._builder.salt, changes.waker_root[linked], changes.waker_goid[linked]
        links = np.empty((len(goid), 3), _U64)
        links[:, 0], links[:, 1], links[:, 2] = mix64(salt, root), mix64(salt ^ _TRACE_SALT, root), mix64(salt, goid)
        return links

    def _changes(self, changes: Changes, waker: np.ndarray, named: np.ndarray) -> np.ndarray:
        """Each change's wall-clock time, event body piece and waker id (_MISSING: none)."""
        to, before = changes.to_state.astype(_U64), changes.from_state.astype(_U64)
        if len(to) and max(to.max(), before.max()) >= _STATE_LIMIT:
            raise ValueError("a state change between states above 2^16")
        reason = np.where(to == _WAITING, changes.wait_reason & 0xFFFF, 0).astype(_U64)
        out = np.empty((len(to), 3), _U64)
        out[:, 0] = changes.time_ns + _U64(self._builder.clock_offset_ns & _MASK64)
        out[:, 1] = self._events(to << 48 | before << 32 | waker.astype(_U64) << 16 | reason)
        out[:, 2] = np.where(named, changes.waker_goid, _MISSING)
        return out

    # --- pieces: what repeats, encoded once by the reference encoder -------------------------------
    def _start_over(self) -> None:
        self._pieces: list[bytes] = [b""]
        # existed_at_attach (no, yes) x traced_in_full (no attribute, true, false)
        self._existed = self._add(*(self._attrs({**({"go.goroutine.existed_at_attach": True} if existed else {}),
                                                  **({} if full is None else {"go.goroutine.traced_in_full": full})})
                                    for existed in (False, True) for full in (None, True, False)))
        self._tails = self._add(*(self._tail(t, e) for t in TraceReason for e in EndReason))
        self._end_bodies = self._add(*(self._event_body(e.value, {}) for e in EndReason))
        self._functions = _Interned(self._pieces, self._function)
        self._sites = _Interned(self._pieces, self._site)
        self._events = _Interned(self._pieces, self._event)

    def _add(self, *pieces: bytes) -> int:
        self._pieces.extend(pieces)
        return len(self._pieces) - len(pieces)

    def _attrs(self, attributes: dict, tag: bytes = b"\x4a") -> bytes:
        return b"".join(self._encoder._attributes(attributes, tag))

    def _event_body(self, name: str, attributes: dict) -> bytes:
        return _payload(self._encoder._event(name, 0, attributes))[9:]  # without its time field

    def _function(self, pc: int) -> tuple[bytes, bytes]:
        """The span name field and kind, then the code.function.name attribute."""
        name = self._builder.function_name(pc)
        return _field(b"\x2a", name.encode("utf-8")) + _KIND_INTERNAL, self._attrs({"code.function.name": name})

    def _site(self, pc: int) -> tuple[bytes]:
        site = self._builder.creation_site(pc) if pc else None
        attrs = {}
        if site is not None:
            attrs["go.goroutine.created_by"] = site[0]
            if site[1]:
                attrs["code.file.path"], attrs["code.line.number"] = site[1], site[2]
        return (self._attrs(attrs),)

    def _event(self, key: int) -> tuple[bytes]:
        """A state change event's body, from its key: to << 48 | from << 32 | Waker << 16 | wait reason;
        without the waker id, which _spanenc appends."""
        to, before = key >> 48, key >> 32 & 0xFFFF
        attrs = {"go.goroutine.state.previous": STATE_NAMES.get(before, str(before))}
        if to == _WAITING:
            attrs["go.goroutine.wait_reason"] = self._builder.wait_reason(key & 0xFFFF)
        attrs.update(event_attributes(Waker(key >> 16 & 0xFFFF), None))
        return (self._event_body(STATE_NAMES.get(to, str(to)), attrs),)

    def _tail(self, reason: TraceReason, end: EndReason) -> bytes:
        """The attributes SpanBuilder.build adds after _span's."""
        attrs = {}
        if reason not in (TraceReason.JOINS_PARENT, TraceReason.NO_PARENT):
            attrs["go.goroutine.trace_reason"] = _TRACE_REASONS[reason]
        attrs["go.goroutine.end_reason"] = end.value
        if end is not EndReason.EXITED:
            attrs["go.goroutine.alive_at_end"] = True
        return self._attrs(attrs)
