"""Pure logic behind the fault handling: the flush deadline, start-up validation, error messages."""

import logging
import sys

import click
import pytest
from click.testing import CliRunner
from elftools.common.exceptions import ELFParseError

from otel_goroutines import analysis, cli, settings_check
from otel_goroutines.binary.buildinfo import BuildInfoError
from otel_goroutines.binary.pclntab import PclntabError
from otel_goroutines.deadline import Deadline, bound_sdk_exporter
from otel_goroutines.errors import AgentError, UnsupportedTarget


def _sdk_exporters():
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetrics
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpans
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetrics
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpans
    return [cls(endpoint="http://127.0.0.1:9", timeout=5) for cls in (GrpcSpans, GrpcMetrics, HttpSpans, HttpMetrics)]


def _timeout(exporter) -> float:
    client = getattr(exporter, "_client", None)
    return client._timeout if hasattr(client, "_timeout") else exporter._timeout


@pytest.mark.parametrize("exporter", _sdk_exporters(), ids=lambda e: type(e).__module__.split(".")[4] + " " + type(e).__name__)
def test_sdk_exporter_timeout_never_past_the_deadline(exporter):
    deadline = Deadline()
    assert bound_sdk_exporter(exporter, deadline, 5) and _timeout(exporter) == 5  # no deadline yet: its own
    deadline.start(1.0)
    assert bound_sdk_exporter(exporter, deadline, 5) and 0.5 < _timeout(exporter) <= 1.0
    deadline.start(0)
    assert not bound_sdk_exporter(exporter, deadline, 5)  # nothing left: no call at all
    exporter.shutdown()


def test_deadline_only_moves_closer():
    deadline = Deadline()
    deadline.start(1.0)
    deadline.start(100.0)
    assert deadline.remaining() <= 1.0


# --- start-up checks ---------------------------------------------------------------------------

@pytest.mark.parametrize("value,says", [
    ("localhost:4317", "has no scheme"), ("http://[::1", "is not a URL"), ("ftp://collector:4317", "has scheme 'ftp'"),
    ("http://:4317", "names no host"), ("http://collector:port", "is not a URL")])
def test_bad_endpoints_refused_with_an_example(value, says):
    with pytest.raises(AgentError) as refused:
        settings_check.check_endpoints(value, "--endpoint", "grpc", {})
    message = str(refused.value)
    assert says in message and "like http://localhost:4317" in message and "\n" not in message


@pytest.mark.parametrize("value", ["http://localhost:4317", "https://collector.example:443", "http://[::1]:4318/", "http://10.0.0.1"])
def test_good_endpoints_pass(value):
    settings_check.check_endpoints(value, "--endpoint", "http/protobuf", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": value})


def test_signal_endpoint_variables_are_checked_and_named():
    with pytest.raises(AgentError, match=r"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT .* like http://localhost:4318/v1/traces"):
        settings_check.check_endpoints(None, "--endpoint", "http/protobuf", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "collector:4318"})
    with pytest.raises(AgentError, match="OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        settings_check.check_endpoints(None, "--endpoint", "grpc", {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "ftp://x"})


def test_header_entries_the_sdk_would_drop_are_named():
    assert settings_check.bad_header_entries("api-key=abc, garbage,a=b c,=x,") == ["garbage", "=x"]


def test_warnings_name_bad_entries_once(monkeypatch, caplog):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "garbage,api-key=1")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "team=a,oops")
    with caplog.at_level(logging.WARNING):
        settings_check.warn_about_dropped_entries()
    ours = [r.getMessage() for r in caplog.records if r.name == settings_check.__name__]
    assert len(ours) == 2 and "'garbage'" in ours[0] and "oops" in ours[1], ours
    assert all(r.name == settings_check.__name__ for r in caplog.records)  # the SDK's own words held back


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "infinity"])
def test_float_options_refuse_nan_and_infinities(value):
    with pytest.raises(click.BadParameter, match="not a finite number"):
        settings_check.FiniteFloat().convert(value, None, None)
    assert settings_check.FiniteFloat(0).convert("2.5", None, None) == 2.5


def test_nan_refused_by_the_option_parser():
    result = CliRunner().invoke(cli.main, ["run", "--spawner-age", "nan", "--", "/bin/true"])
    assert result.exit_code == 2 and "'nan' is not a finite number" in result.output


# --- internal errors said as what they mean ----------------------------------------------------

@pytest.mark.parametrize("error,says", [
    (ELFParseError("expected 4, found 0"), "not a readable ELF file, truncated or corrupt"),
    (PclntabError("bad record of function #3"), "corrupt Go function table"),
    (BuildInfoError("truncated varint in Go build info"), "unreadable Go build info")])
def test_binary_parser_errors_become_one_line_refusals(error, says):
    with pytest.raises(UnsupportedTarget, match=f"^/bin/prog: {says}"):
        with analysis.reading_binary("/bin/prog"):
            raise error


def test_truncated_binary_inspected(tmp_path):
    truncated = tmp_path / "truncated"
    truncated.write_bytes(open(sys.executable, "rb").read(5000))
    result = CliRunner().invoke(cli.main, ["inspect", str(truncated)])
    assert result.exit_code == 1 and "unexpected" not in result.output
    assert result.output.startswith(f"otel-goroutines: error: {truncated}: ")


def test_os_errors_name_the_file(capsys):
    def fails():
        open("/proc/no-such-dir/x", "w")
    with pytest.raises(SystemExit):
        cli._one_line_errors(fails)()
    assert capsys.readouterr().err == "otel-goroutines: error: /proc/no-such-dir/x: No such file or directory\n"
