"""The one error hierarchy of keepbest.

Every class is also a built-in exception, so code that already catches
``FileNotFoundError`` or ``ValueError`` keeps working. Messages follow
``<what failed>: <why>. <how to fix>. Received: x=...``.
"""

from __future__ import annotations


class KeepbestError(Exception):
    """Base class of every error raised by keepbest."""


class CheckpointNotFoundError(KeepbestError, FileNotFoundError):
    """No committed checkpoint matches the request."""


class CorruptCheckpointError(KeepbestError, ValueError):
    """A committed checkpoint does not match its manifest (size, hash, header)."""


class StorageError(KeepbestError, OSError):
    """The storage layer could not make bytes durable or remove them."""


class AsyncSaveError(KeepbestError, RuntimeError):
    """A save that ran in the background failed; raised on the next call."""


class StateMismatchError(KeepbestError, ValueError):
    """Saved tensors do not fit the object they are restored into."""


class MonitorError(KeepbestError, ValueError):
    """The monitored quantity cannot exist for this model."""


class PublishError(KeepbestError, RuntimeError):
    """Publishing checkpoints to a remote tracker (W&B, MLflow) failed; the local checkpoints are intact."""


class CoordinationError(KeepbestError, RuntimeError):
    """Processes saving one checkpoint together lost each other (a process died, hung or failed);
    nothing was committed."""
