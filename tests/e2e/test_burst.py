"""A burst far larger than the kernel ring buffer, through the real consumption path (libbpf into
the C record sink, numpy batches, the batch span encoder, OTLP to a real receiver): every
goroutine the kernel counted as created is exported or counted as lost, exactly."""

import re

import pytest

from helpers import OtlpHttpReceiver, build_program, run_agent

pytestmark = pytest.mark.ebpf

BURST = 60_000  # goroutines alive at once, then ending together: ~16 MB of end records against a 1 MiB buffer


def _figures(stderr: str) -> dict[str, int]:
    figures = {"seen": int(re.search(r"^goroutines seen: (\d+)$", stderr, re.M)[1]),
               "created": int(re.search(r"^goroutines created while traced: (\d+)$", stderr, re.M)[1])}
    degraded = re.search(r"^dropped or degraded: (.*)$", stderr, re.M)
    for item in (degraded[1].split(", ") if degraded else ()):
        name, value = item.split("=")
        figures[name] = int(value)
    return figures


@pytest.mark.parametrize("detail", ["lifecycle", "states"])
def test_burst_larger_than_the_ring_buffer_is_all_accounted_for(detail):
    program = build_program("allocchurn")
    receiver = OtlpHttpReceiver(keep_spans=False)
    try:
        run = run_agent(["run", "-q", "--detail", detail, "--ring-buffer-mib", "1", "--exporter", "otlp",
                         "--protocol", "http/protobuf", "--endpoint", f"http://127.0.0.1:{receiver.port}",
                         "--metrics-interval", "0", "--flush-timeout", "120", "--",
                         str(program), "-n", str(BURST), "-batch", str(BURST), "-allocs", "1", "-warmup", "0"],
                        timeout=300)
    finally:
        receiver.close()
    assert run.returncode == 0, run.stderr
    f = _figures(run.stderr)
    # The burst overflowed the ring buffer: ends waited in the kernel map (late, not lost).
    assert f.get("ends_deferred_ringbuf", 0) > 0, run.stderr
    assert f["created"] >= BURST
    # Every goroutine created is a span received, or a counted loss.
    assert f["seen"] == f["created"] - f.get("goroutines_untracked_map_full", 0), run.stderr
    assert receiver.span_count == f["seen"] - f.get("spans_not_exported", 0) - f.get("spans_sampled_out", 0), run.stderr
    assert f.get("records_malformed", 0) == f.get("records_dropped_no_memory", 0) == 0
