"""The package's compiled parts (each C file's first comment says why it is C): the ring-buffer
record sink, the batch span encoder, the OTLP protobuf to OTLP/JSON transcoder and a uprobe site for measuring the trap. The rest of the package is declared in pyproject.toml.
`pip install -e .` builds them in place."""
from setuptools import Extension, setup

setup(ext_modules=[Extension(f"otel_goroutines.{name}", [f"otel_goroutines/{name}.c"], extra_compile_args=["-O2"])
                   for name in ("_ringsink", "_spanenc", "_otlpjson", "_trapsite")])
