#!/usr/bin/env bash
# The whole 3-node fault suite (tests/faults, docs/faults.md): every case in both delivery modes, on a
# real 3-node KRaft cluster started on free loopback ports and stopped afterwards. The default `pytest`
# run (CI) runs only its subset; this runs all of it (about 15 minutes on 2 cores). Extra arguments go
# to pytest, e.g. `scripts/faults.sh -k exactly-once`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/kafka/kafka-local.sh fetch >&2
exec .venv/bin/python -m pytest tests/faults --all-faults -p no:cacheprovider -v "$@"
