"""The package's compiled part, the batch span encoder (otel_goroutines/fastspans.py says why C); the
rest of the package is declared in pyproject.toml. `pip install -e .` builds it in place."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("otel_goroutines._spanenc", ["otel_goroutines/_spanenc.c"], extra_compile_args=["-O2"])])
