#!/bin/sh
# Entry point of the agent image: make kernel headers visible to bcc, check tracefs, then
# run `otel-goroutines ARGS...` (as PID 1's replacement, so SIGTERM reaches the agent).
set -eu

kdir="/lib/modules/$(uname -r)"
if [ ! -e "$kdir/build/include/linux/kconfig.h" ] && [ ! -e "$kdir/source/include/linux/kconfig.h" ] \
   && [ ! -e /sys/kernel/kheaders.tar.xz ]; then
  # No headers from the host: use the image's Debian headers (split in two directories; bcc needs both).
  arch_dir=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  if [ -n "$arch_dir" ] && mkdir -p "$kdir" 2>/dev/null \
     && ln -sfn "$arch_dir" "$kdir/build" && ln -sfn "${arch_dir%-amd64}-common" "$kdir/source"; then
    echo "otel-goroutines-entrypoint: no kernel headers for $(uname -r) from the host; using $(basename "$arch_dir")" >&2
  else
    echo "otel-goroutines-entrypoint: no kernel headers for $(uname -r): mount the host's /lib/modules and /usr/src" >&2
  fi
fi

if [ ! -d /sys/kernel/tracing/events ] && [ ! -d /sys/kernel/debug/tracing/events ]; then
  echo "otel-goroutines-entrypoint: tracefs is not visible: mount the host's /sys/kernel/tracing read-write (bcc creates its uprobes there; read-only only with CAP_SYS_ADMIN)" >&2
fi

exec /opt/otel-goroutines/venv/bin/otel-goroutines "$@"
