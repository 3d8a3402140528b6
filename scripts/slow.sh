#!/usr/bin/env bash
# The integration tests marked `slow_integration` (docs/development.md), on a real Kafka broker (and
# Prometheus) started by the tests. The default `pytest` run (CI) leaves them out for time but keeps the
# main case of each of their suites; this runs them. Extra arguments go to pytest, e.g.
# `scripts/slow.sh -k rebalance`, or `scripts/slow.sh -m integration` for all of tests/integration with them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/kafka/kafka-local.sh fetch >&2
exec .venv/bin/python -m pytest tests/integration --all-slow -m slow_integration -p no:cacheprovider -v "$@"
