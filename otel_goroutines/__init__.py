"""otel-goroutines: every goroutine of a Go program as an OpenTelemetry span, traced with eBPF."""

__version__ = "0.1.0"
