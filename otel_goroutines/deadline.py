"""One time limit for everything still being sent at the end (spans and metrics alike), so that
--flush-timeout bounds the agent's exit whatever the collector does (accepts and never answers,
answers 503, drops the connection)."""

from __future__ import annotations

import math
import time


class Deadline:
    """Unset (infinitely far) while tracing runs; start() fixes it once the target has ended."""

    def __init__(self) -> None:
        self._at = math.inf

    def start(self, seconds: float) -> None:
        self._at = min(self._at, time.monotonic() + seconds)

    def remaining(self) -> float:
        return max(0.0, self._at - time.monotonic())


def bound_sdk_exporter(exporter, deadline: Deadline, timeout_s: float) -> bool:
    """Set an SDK OTLP exporter's per-call timeout to timeout_s, or to what is left before the
    deadline if that is less. Both SDK exporters retry only within that timeout, so one call
    never runs past the deadline. False when no time is left: do not call the exporter."""
    left = min(timeout_s, deadline.remaining())
    if left <= 0:
        return False
    client = getattr(exporter, "_client", None)
    if hasattr(client, "_timeout"):     # HTTP: the timeout lives in its _OTLPHTTPClient
        client._timeout = left
    elif hasattr(exporter, "_timeout"):  # gRPC: on the exporter (its _client is the stub)
        exporter._timeout = left
    # An SDK without either attribute keeps its own timeout; the joins at close still bound the exit.
    return True
