#!/usr/bin/env bash
# A real gccgo for the test that gccgo builds are refused (tests/e2e/test_promises.py), without
# installing it: Debian's gccgo-12, libgo-12-dev and libgo21 (43 MB) fetched by apt-get download and
# unpacked under .cache; the machine's own gcc-12 (make setup installs gcc) supplies the rest of the
# compiler driver's files and binutils. Idempotent; prints the command, which takes gccgo's arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(apt-cache policy gccgo-12 | sed -n 's/^ *Candidate: //p')
[ -n "$version" ] && [ "$version" != "(none)" ] || { echo "gccgo.sh: apt knows no gccgo-12 (run apt-get update)" >&2; exit 1; }
out="$PWD/.cache/gccgo/$version"
if [ ! -e "$out/.complete" ]; then
  rm -rf "$out" && mkdir -p "$out/debs" "$out/root"
  (cd "$out/debs" && apt-get download -qq "gccgo-12=$version" "libgo-12-dev=$version" "libgo21=$version" 2>&1 | grep -v unsandboxed >&2 || true)
  for deb in "$out"/debs/*.deb; do dpkg-deb -x "$deb" "$out/root"; done
  rm -rf "$out/debs"
  touch "$out/.complete"
fi
# Written each time, finding its files beside itself: .cache is shared by clones, which come and go.
cat > "$out/gccgo" <<'WRAPPER'
#!/bin/sh
r="$(cd "$(dirname "$0")" && pwd)/root"
exec "$r/usr/bin/x86_64-linux-gnu-gccgo-12" -B "$r/usr/lib/gcc/x86_64-linux-gnu/12/" -B "$r/usr/libexec/gcc/x86_64-linux-gnu/12/" \
  -B /usr/lib/gcc/x86_64-linux-gnu/12/ -B /usr/libexec/gcc/x86_64-linux-gnu/12/ -L "$r/usr/lib/x86_64-linux-gnu" -static-libgo "$@"
WRAPPER
chmod +x "$out/gccgo"
echo "$out/gccgo"
