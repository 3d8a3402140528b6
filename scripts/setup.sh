#!/usr/bin/env bash
# Set up everything the project needs on a fresh Debian/Ubuntu machine (idempotent):
#   1. Java 17 + Maven (Debian packages) if missing, for the local Kafka broker
#   2. .venv with the project and its dev/bench/spark dependencies (pinned by constraints.txt)
#   3. Kafka jars from Maven Central into deploy/kafka/libs/
#   4. Prometheus + promtool (Debian package) when WITH_PROMETHEUS=1
#   5. kcat (Debian package), an independent Kafka client for the interoperability tests, when WITH_KCAT=1
#   6. jemalloc (Debian package libjemalloc2), the allocator the image preloads, when WITH_JEMALLOC=1
#   7. a schema registry (Apicurio, from Maven Central jars into deploy/registry/target/) when WITH_REGISTRY=1
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
SUDO=()
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO=(sudo)

apt_install() {
    command -v apt-get >/dev/null 2>&1 || { echo "setup: please install: $*" >&2; exit 1; }
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

if ! command -v java >/dev/null 2>&1 || ! command -v mvn >/dev/null 2>&1; then
    echo "setup: installing Java 17 and Maven" >&2
    apt_install openjdk-17-jre-headless maven
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PYTHON --version)" >&2
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ ! -e "$stamp" ]; then
    echo "setup: installing Python dependencies (first time: a few minutes, TensorFlow is large)" >&2
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev,bench,spark]"
    rm -f .venv/.installed-*
    touch "$stamp"
fi

bash deploy/kafka/kafka-local.sh fetch >&2

if [ "${WITH_PROMETHEUS:-0}" = 1 ]; then
    bash scripts/install-prometheus.sh >&2
fi
if [ "${WITH_KCAT:-0}" = 1 ]; then
    bash scripts/install-kcat.sh >&2
fi
if [ "${WITH_JEMALLOC:-0}" = 1 ] \
        && ! .venv/bin/python -c "import ctypes.util, sys; sys.exit(ctypes.util.find_library('jemalloc') is None)"; then
    echo "setup: installing jemalloc (libjemalloc2)" >&2
    apt_install libjemalloc2
fi
if [ "${WITH_REGISTRY:-0}" = 1 ]; then
    # The registry (Quarkus 2.16) needs a Java 17 even where the default java is newer.
    if [ -z "${REGISTRY_JAVA_HOME:-}" ] && ! compgen -G "/usr/lib/jvm/*17*/bin/java" >/dev/null; then
        echo "setup: installing Java 17 for the schema registry" >&2
        apt_install openjdk-17-jdk-headless
    fi
    bash deploy/registry/registry-local.sh fetch >&2
fi
echo "setup: ready" >&2
