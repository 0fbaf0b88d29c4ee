"""`python -m otel_goroutines`: the otel-goroutines command."""

from .cli import main

main()
