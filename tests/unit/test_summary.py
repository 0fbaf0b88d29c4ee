"""The summary's table of start functions."""

import numpy as np

from otel_goroutines.tracker import Summary

LONG = "google.golang.org/grpc/internal/transport.(*http2Client).reader.func1.gowrap2"  # 78 characters


def test_long_start_functions_are_cut_visibly_keeping_both_ends():
    summary = Summary()
    summary.add_batch([LONG, "main.worker"], np.array([0, 1, 1]), np.array([10, 20, 30]), np.zeros(3, bool))
    rows = summary.render({}).splitlines()[2:4]  # after the totals and the header
    worker = next(r for r in rows if "main.worker" in r)
    cut = next(r for r in rows if r is not worker)
    name = cut.split()[0]
    assert len(name) == 60 and "..." in name
    assert name.startswith("google.golang.org/gr") and name.endswith(".(*http2Client).reader.func1.gowrap2")
    assert worker.split()[:2] == ["main.worker", "2"]
