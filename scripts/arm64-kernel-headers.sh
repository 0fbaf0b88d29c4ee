#!/usr/bin/env bash
# Debian's arm64 kernel headers, for compiling the BPF program for arm64 on this amd64 machine
# (tests/unit/test_arm64.py): bcc with ARCH=arm64 and BCC_KERNEL_SOURCE=<the printed directory>.
# The arm64 package comes from Debian's archive through apt with a private state directory, so the
# machine's apt configuration gains no foreign architecture; it is merged with the installed
# (architecture-independent) linux-headers-*-common of the same version. Idempotent; prints the directory.
set -euo pipefail
cd "$(dirname "$0")/.."
common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
[ -n "$common" ] || { echo "arm64-kernel-headers: no /usr/src/linux-headers-*-common; run make setup" >&2; exit 1; }
abi=$(basename "${common%-common}" | sed 's/^linux-headers-//')
version=$(dpkg-query -W -f='${Version}' "linux-headers-$abi-common")
out="$PWD/.cache/arm64-kernel-headers/$abi-$version"
if [ ! -e "$out/.complete" ]; then
  apt_dir="$PWD/.cache/apt-arm64"
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial"
  touch "$apt_dir/status"
  apt_opts=(-qq -o APT::Architecture=arm64 -o APT::Architectures::=arm64 -o "Dir::State::Lists=$apt_dir/lists"
            -o "Dir::State::status=$apt_dir/status" -o "Dir::Cache=$apt_dir" -o "Dir::Cache::archives=$apt_dir/archives")
  deb=$(ls "$apt_dir"/linux-headers-"$abi"-arm64_"${version//:/%3a}"_arm64.deb 2>/dev/null || true)
  if [ -z "$deb" ]; then
    apt-get "${apt_opts[@]}" update 2>&1 | grep -v unsandboxed >&2 || true
    (cd "$apt_dir" && apt-get "${apt_opts[@]}" download "linux-headers-$abi-arm64=$version" 2>&1 | grep -v unsandboxed >&2 || true)
    deb=$(ls "$apt_dir"/linux-headers-"$abi"-arm64_*_arm64.deb)
  fi
  rm -rf "$out" "$out.tmp"
  mkdir -p "$out.tmp/deb"
  dpkg-deb -x "$deb" "$out.tmp/deb"
  # One tree, as bcc wants it: the common headers (symbolic links) under the arm64 package's own files.
  cp -rs "$common/." "$out.tmp/tree"
  cp -r --remove-destination "$out.tmp/deb/usr/src/linux-headers-$abi-arm64/." "$out.tmp/tree"
  mv "$out.tmp/tree" "$out"
  rm -rf "$out.tmp"
  touch "$out/.complete"
fi
echo "$out"
