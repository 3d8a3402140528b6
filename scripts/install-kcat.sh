#!/usr/bin/env bash
# Install kcat (librdkafka's command-line producer/consumer) from the Debian/Ubuntu `kcat` package, if missing.
#
# Used by CI and local setup: tests/integration/test_interop.py produces compressed topics, keys, headers and
# tombstones with it, as an independent client would, and reads the worker's alerts and dead letters back.
#
# Usage: scripts/install-kcat.sh        (as root, or with sudo available)
set -euo pipefail

if command -v kcat >/dev/null 2>&1; then
    echo "kcat already installed: $(kcat -V 2>&1 | head -n 1)"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    echo "error: run as root or install sudo; installing the kcat package needs apt-get" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: apt-get not found; install kcat with your system's package manager instead" >&2
    exit 1
fi

"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kcat
kcat -V 2>&1 | head -n 1
