#!/usr/bin/env bash
# Install promtool and prometheus from the Debian/Ubuntu `prometheus` package, if missing.
#
# Used by CI and local setup so tests/unit/test_deploy_static.py can run `promtool check` and
# `promtool test rules`. Never leaves a prometheus service running: the package's postinst would
# start one on :9090, which would clash with the integration tests' own Prometheus.
#
# Usage: scripts/install-prometheus.sh        (as root, or with sudo available)
set -euo pipefail

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    echo "promtool already installed: $(promtool --version 2>&1 | head -n 1)"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    echo "error: run as root or install sudo; installing the prometheus package needs apt-get" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: apt-get not found; install promtool from https://prometheus.io/download/ instead" >&2
    exit 1
fi

# A policy-rc.d that exits 101 tells invoke-rc.d and deb-systemd-invoke not to start services.
policy=/usr/sbin/policy-rc.d
added_policy=false
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
    "${SUDO[@]}" chmod 755 "$policy"
    added_policy=true
fi
remove_policy() {
    if [ "$added_policy" = true ]; then "${SUDO[@]}" rm -f "$policy"; fi
}
trap remove_policy EXIT

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus

# Belt and braces: on a host running systemd, make sure the service is neither running nor enabled.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    "${SUDO[@]}" systemctl disable --now prometheus.service >/dev/null 2>&1 || true
fi

promtool --version 2>&1 | head -n 1
