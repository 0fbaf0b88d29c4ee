# The two commands of the setup contract: `make demo` and `make test` (both as root on Debian 12).
SHELL := /bin/bash
VENV := .venv
AGENT := $(VENV)/bin/otel-goroutines

.PHONY: setup demo test unit bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	$(VENV)/bin/python -m pytest -q --durations=12 tests

unit: setup
	$(VENV)/bin/python -m pytest -q tests/unit

bench: setup
	$(VENV)/bin/python bench/run.py

clean:
	rm -rf $(VENV) .cache demo/demo goroutine-spans.jsonl
