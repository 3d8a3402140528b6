"""Benchmarks of the product against peers on public data (run as modules: `python -m benchmarks.quality`)."""
