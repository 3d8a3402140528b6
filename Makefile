.DEFAULT_GOAL := help
.PHONY: help setup run test unit integration faults slow lint bench-quality bench-throughput bench-value-formats bench-compression kafka-start kafka-stop

help:  ## list the everyday commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

setup:  ## install everything: .venv, Kafka jars, Java/Maven if missing
	bash scripts/setup.sh

run:  ## the demo: local Kafka, train on the sample, worker, replay, alerts (Ctrl-C cleans up)
	bash scripts/demo.sh

test:  ## the whole suite as CI runs it (setup, ruff, mypy, unit + integration)
	bash scripts/test.sh

unit:  ## unit tests only (no services)
	.venv/bin/python -m pytest tests/unit -q

integration:  ## integration tests (starts real Kafka and Prometheus on 127.0.0.1)
	.venv/bin/python -m pytest tests/integration -q

faults:  ## the whole 3-node fault suite, both delivery modes (docs/faults.md; CI runs a subset)
	bash scripts/faults.sh

slow:  ## the integration cases CI leaves out for time (slow_integration: the other client's case, exactly-once)
	bash scripts/slow.sh

lint:  ## ruff and mypy
	.venv/bin/ruff check training worker tests benchmarks scripts && .venv/bin/mypy

bench-quality:  ## detection quality vs IsolationForest and PyOD KNN (writes benchmarks/results/quality.md)
	.venv/bin/python -m benchmarks.quality

bench-throughput:  ## worker throughput and latency on a local broker (writes benchmarks/results/throughput.md)
	.venv/bin/python -m benchmarks.throughput

bench-value-formats:  ## decode and scoring-path throughput per value format (writes benchmarks/results/value-formats.md)
	.venv/bin/python -m benchmarks.value_formats --out benchmarks/results

bench-compression:  ## bytes and publish time of alerts/dead letters per codec (writes benchmarks/results/output_compression.md)
	.venv/bin/python -m benchmarks.output_compression

kafka-start:  ## start a local single-node Kafka on 127.0.0.1:9092
	bash deploy/kafka/kafka-local.sh start

kafka-stop:  ## stop it
	bash deploy/kafka/kafka-local.sh stop
