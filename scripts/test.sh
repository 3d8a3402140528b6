#!/usr/bin/env bash
# The whole test suite on a fresh machine: set up, lint, type-check, unit tests, then integration
# tests against a real Kafka broker and a real Prometheus started by the project's own scripts (kcat too).
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_PROMETHEUS=1 WITH_KCAT=1 WITH_JEMALLOC=1 WITH_REGISTRY=1 bash scripts/setup.sh

echo "== ruff"
.venv/bin/ruff check training worker tests benchmarks scripts
echo "== mypy"
.venv/bin/mypy
echo "== pytest (unit, then integration: real Kafka + Prometheus on 127.0.0.1)"
.venv/bin/python -m pytest -p no:cacheprovider --durations=25 "$@"  # the slowest: where CI time goes
