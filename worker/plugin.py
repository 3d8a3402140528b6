"""The one interface through which a batch's side consumers meet the loop.

Model reload, heap trimming, shadow scoring, flood control and drift are plugins: `worker/wiring.py`
builds them from the settings and the loop (`worker/loop.py`) calls each hook at its place in its
numbered steps, plugin by plugin in the order given. Every hook does nothing unless a plugin overrides it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.pipeline import BatchResult, Pipeline
    from worker.records import Alert, Record


class Plugin:
    """A side consumer of the batch; see the module docstring."""

    def between_batches(self) -> Pipeline | None:
        """Step 0, before every poll: housekeeping; may return a new model's pipeline to score from now on."""
        return None

    def on_model(self, pipeline: Pipeline) -> None:
        """Step 0: `pipeline` (a newly promoted model) scores from the next batch on."""

    def on_processed(self, records: Sequence[Record], result: BatchResult, alerts: list[Alert]) -> list[Alert]:
        """Step 2, no I/O: the batch is scored; returns which of `alerts` to publish (and anything to add)."""
        return alerts

    def on_idle(self) -> list[Alert]:
        """After an empty poll: what to publish now that the batch's clock has moved (nothing by default)."""
        return []

    def on_delivered(self) -> None:
        """After step 3 (and 4): what `on_processed` or `on_idle` chose to publish was acknowledged."""

    def on_batch(self, result: BatchResult) -> None:
        """Step 5, after the commit: a delivered batch, for metrics; never raises into the loop."""
