"""Worker errors: all derive from the project's root error, so the CLI reports them in one line."""

from training.errors import AnomalyError


class WorkerError(AnomalyError):
    """Root of the worker's own errors."""


class BrokerUnavailable(WorkerError):
    """No broker answered; retried with backoff, the worker reports not-ready meanwhile."""


class DeliveryError(WorkerError):
    """Some alert or dead letter was not acknowledged: the batch is not committed and is read again."""


class TransactionAborted(DeliveryError):
    """Exactly-once: the batch's transaction was aborted, so none of it is visible; it is read again."""


class CommitError(WorkerError):
    """An offset commit failed: the delivered offsets stay pending and are committed with the next batch."""


class RebalanceInProgress(CommitError):
    """The consumer group is rebalancing: the commit waits until the member is stable again."""


class ModelFailure(WorkerError):
    """The model fails on a known-good row: not a record's fault, so the worker stops without committing."""
