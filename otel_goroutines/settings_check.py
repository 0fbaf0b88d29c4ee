"""Start-up checks of what the user configured: a mistake is a one-line refusal (or, for entries
the SDK would drop, a warning naming them) before any program is launched or attached, not a
run whose every export fails."""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from typing import Mapping
from urllib.parse import urlsplit

import click
from opentelemetry.sdk.resources import OTELResourceDetector
from opentelemetry.util.re import parse_env_headers

from .errors import AgentError

log = logging.getLogger(__name__)

_BASE_EXAMPLE = {"grpc": "http://localhost:4317", "http/protobuf": "http://localhost:4318"}
# Per-signal variables are full URLs for HTTP (the SDK appends no path to them).
_SIGNAL_ENDPOINTS = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "/v1/traces", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "/v1/metrics"}
_HEADER_VARIABLES = ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_METRICS_HEADERS")


class FiniteFloat(click.FloatRange):
    """A FloatRange that refuses NaN and infinities: float() accepts them, no setting means them,
    and NaN passes every range comparison."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def check_endpoint(value: str, source: str, example: str) -> None:
    """Refuse an OTLP endpoint the exporters could never reach: not an http(s) URL with a host."""
    try:
        url = urlsplit(value)
        url.port  # a port that is not a number raises here
    except ValueError as exc:
        raise AgentError(f"{source} {value!r} is not a URL ({exc}); use one like {example}") from None
    if url.scheme not in ("http", "https"):
        problem = "has no scheme" if "://" not in value else f"has scheme {url.scheme!r}"
        raise AgentError(f"{source} {value!r} {problem}; use http:// or https://, like {example}")
    if not url.hostname:
        raise AgentError(f"{source} {value!r} names no host; use one like {example}")


def check_endpoints(endpoint: str | None, endpoint_source: str, protocol: str, environ: Mapping[str, str]) -> None:
    """The base endpoint (--endpoint or OTEL_EXPORTER_OTLP_ENDPOINT) and the per-signal variables."""
    base = _BASE_EXAMPLE[protocol]
    if endpoint:
        check_endpoint(endpoint, endpoint_source, base)
    for variable, path in _SIGNAL_ENDPOINTS.items():
        if environ.get(variable):
            check_endpoint(environ[variable], variable, base + (path if protocol == "http/protobuf" else ""))


@contextmanager
def _said_once(*names: str):
    """Hold what these SDK loggers warn while their parsers run, for the caller to say in its own
    words; and drop the same warnings later, when the SDK parses the same variables again (as
    it builds the exporters and the resource)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in names]
    saved = [(logger, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.propagate = False
    try:
        yield records
    finally:
        for logger, propagate in saved:
            logger.removeHandler(handler)
            logger.propagate = propagate
    said = {record.getMessage() for record in records}
    for logger in loggers:
        logger.addFilter(lambda record: record.getMessage() not in said)


def bad_header_entries(value: str) -> list[str]:
    """Entries of an OTEL_EXPORTER_OTLP_*HEADERS value that the SDK's exporters drop (they parse
    liberally: name=value, URL-encoded or not)."""
    with _said_once("opentelemetry.util.re"):
        return [entry.strip() for entry in value.split(",") if entry.strip() and not parse_env_headers(entry, liberal=True)]


def warn_about_dropped_entries() -> None:
    """One warning per header or resource attribute entry that would be silently dropped (from the
    process environment, which the SDK reads itself)."""
    for variable in _HEADER_VARIABLES:
        for entry in bad_header_entries(os.environ.get(variable, "")):
            log.warning("%s: entry %r ignored: not name=value (like %s=authorization=Bearer%%20TOKEN,x-tenant=a)",
                        variable, entry, variable)
    for problem in resource_attribute_problems():
        log.warning("OTEL_RESOURCE_ATTRIBUTES: %s (entries are key=value, like "
                    "OTEL_RESOURCE_ATTRIBUTES=deployment.environment=prod,team=a)", problem)


def resource_attribute_problems() -> list[str]:
    """What the SDK's own OTEL_RESOURCE_ATTRIBUTES parser drops, as it words it."""
    with _said_once("opentelemetry.sdk.resources", "opentelemetry.attributes") as records:
        OTELResourceDetector().detect()
    return [record.getMessage() for record in records if record.levelno >= logging.WARNING]
