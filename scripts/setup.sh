#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine (as root): system packages, kernel-header
# links for bcc, tracefs, and a .venv with the package and its `otel-goroutines` command.
# A second run changes nothing and fetches nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "setup: $*"; }

# --- system packages -----------------------------------------------------------------
# python3-bpfcc/libbpfcc: bcc (not on PyPI); linux-headers: bcc compiles C at run time;
# golang-go: Debian's Go 1.19, one cell of the version matrix; bpftrace: the benchmark's baseline;
# gcc, python3-dev: pip builds the package's compiled parts (otel_goroutines/*.c, setup.py);
# podman, debootstrap: the tests build the agent image (tests/image_build.py) on a Debian base.
packages=(python3-bpfcc libbpfcc linux-headers-amd64 python3-venv golang-go bpftrace make gcc python3-dev podman debootstrap)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- kernel headers for bcc ----------------------------------------------------------
# This kernel ships no headers. Debian splits its header package in two; bcc needs both links.
kdir="/lib/modules/$(uname -r)"
if [ ! -e "$kdir/build/include/linux/kconfig.h" ] && [ ! -e "$kdir/source/include/linux/kconfig.h" ] && [ ! -e /sys/kernel/kheaders.tar.xz ]; then
  arch_dir=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  [ -n "$arch_dir" ] || { echo "setup: no /usr/src/linux-headers-*-amd64 after installing linux-headers-amd64" >&2; exit 1; }
  common_dir="${arch_dir%-amd64}-common"
  mkdir -p "$kdir"
  ln -sfn "$arch_dir" "$kdir/build"
  ln -sfn "$common_dir" "$kdir/source"
  say "linked kernel headers $(basename "$arch_dir") for $(uname -r)"
fi

# --- tracefs (bcc detaches uprobes through it) -------------------------------------------
if ! mountpoint -q /sys/kernel/tracing 2>/dev/null; then
  mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null && say "mounted tracefs" || say "could not mount tracefs (uprobes still work)"
fi

# --- caches shared by every clone on this machine -------------------------------------
# Toolchains, test binaries and the collector/Jaeger builds live in .cache; pointing it at a
# machine-wide folder lets a fresh clone (CI) reuse what an earlier run fetched and built.
if [ ! -e .cache ]; then
  shared="${OTEL_GOROUTINES_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/otel-goroutines}"
  mkdir -p "$shared"
  ln -s "$shared" .cache
fi

# --- the venv --------------------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  /usr/bin/python3 -m venv .venv
fi
# Expose only Debian's bcc package to the venv, not all of dist-packages.
mkdir -p .venv/bcc-only
ln -sfn /usr/lib/python3/dist-packages/bcc .venv/bcc-only/bcc
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD/.venv/bcc-only" > "$site/bcc-only.pth"

# Reinstall (and so recompile) when the package's metadata or a compiled part changes.
stamp=.venv/.installed-$(cat pyproject.toml setup.py otel_goroutines/*.c | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  say "installing the package into .venv"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[test]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
.venv/bin/python -c 'import bcc, otel_goroutines' || { echo "setup: the venv cannot import bcc or otel_goroutines" >&2; exit 1; }

# --- arm64 kernel headers: the BPF program's arm64 compile check (tests/unit/test_arm64.py) ----
# bcc compiles for arm64 with ARCH=arm64 against them; apt fetches Debian's package with a private
# state directory under .cache (the machine's apt gains no foreign architecture).
scripts/arm64-kernel-headers.sh >/dev/null || { echo "setup: could not get Debian's arm64 kernel headers" >&2; exit 1; }

# --- a Go toolchain for building the demo and the test programs ------------------------------
if ! scripts/go-toolchain.sh >/dev/null; then
  echo "setup: no usable Go toolchain" >&2; exit 1
fi
say "ready ($(scripts/go-toolchain.sh) ; $(.venv/bin/otel-goroutines --version))"
