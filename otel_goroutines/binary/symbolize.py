"""Runtime addresses -> Go function names and source lines, through the Go function table."""

from __future__ import annotations

import itertools
import re
from functools import lru_cache
from typing import Callable

from . import disasm
from .pclntab import Func, FuncTable


class Symbolizer:
    def __init__(self, functions: FuncTable, code_of: Callable[[Func], bytes], load_bias: int = 0,
                 isa: disasm.Isa = disasm.AMD64, inlined_call: Callable[[Func], str | None] = lambda func: None):
        self._functions = functions
        self._isa = isa
        self._code_of = code_of
        self._inlined_call = inlined_call  # the function inlined first into a function's body (GoBinary.inlined_call)
        self.load_bias = load_bias  # runtime address - link-time address (non-zero for PIE)

    @lru_cache(maxsize=65536)
    def function(self, pc: int) -> str:
        """The start function of a goroutine whose startpc is pc, as Go's traceback names it."""
        func = self._functions.lookup(pc - self.load_bias)
        if func is None:
            return f"0x{pc:x}"
        # `go f(x)` starts a compiler-made wrapper closure that calls f(x), or holds it inlined: the
        # inline tree then names f, whatever f calls first (Go's traceback shows f, not the wrapper).
        if self._functions.is_wrapper(func):
            return self._inlined_call(func) or self._wrapped(func) or self._literal_at(func) or func.name
        return func.name

    def _wrapped(self, wrapper: Func) -> str | None:
        # f was not inlined: the wrapper's first direct call outside the runtime (allocation,
        # stack growth) is f.
        in_runtime = wrapper.name.startswith("runtime.")
        for target in self._isa.call_targets(self._code_of(wrapper), wrapper.entry):
            callee = self._functions.lookup(target)
            if callee is not None and not callee.name.startswith("runtime.morestack") and \
                    (in_runtime or not callee.name.startswith("runtime.")):
                return callee.name
        return None

    def _literal_at(self, wrapper: Func) -> str | None:
        # `go func(x) {...}(y)` whose literal captures variables: the wrapper calls the closure value
        # it captured, an indirect call. That literal starts where the go statement is: it is the one
        # closure of the enclosing function (outer.funcN) whose code starts at the wrapper's line.
        # (An interface method or a func value, `go c.Close()`, cannot be known from the binary.)
        # Wrappers are outer.gowrapN from Go 1.22, closures of their own before (outer.funcN).
        outer = re.sub(r"\.(gowrap|func)\d+$", "", wrapper.name)
        where = self._functions.line(wrapper.entry)
        if outer == wrapper.name or where is None:
            return None
        found = []
        for n in itertools.count(1):  # closures are numbered from 1 in their enclosing function
            closure = self._functions.by_name(f"{outer}.func{n}")
            if closure is None:
                break
            if closure != wrapper and self._functions.line(closure.entry) == where:
                found.append(closure.name)
        return found[0] if len(found) == 1 else None

    @lru_cache(maxsize=65536)
    def creation_site(self, go_pc: int) -> tuple[str, str, int] | None:
        """(creating function, file, line) of the `go` statement whose return address is go_pc."""
        pc = go_pc - self.load_bias
        func = self._functions.lookup(pc)
        if func is None:
            return None
        # Like the runtime's traceback: a return address belongs to the line of the call before it.
        where = self._functions.line(pc - 1 if pc > func.entry else pc)
        if where is None:
            return func.name, "", 0
        return func.name, where[0], where[1]
