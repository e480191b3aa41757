"""keepbest: crash-safe, fast and inspectable model checkpointing.

The core (this package) is framework-free; ``keepbest.keras`` is the Keras 3
adapter, imported on its own so that the core never pulls a framework in.
"""

from keepbest._version import __version__
from keepbest.checkpoint import Checkpoint
from keepbest.discovery import list_checkpoints
from keepbest.errors import (
    AsyncSaveError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    KeepbestError,
    MonitorError,
    PublishError,
    StateMismatchError,
    StorageError,
)
from keepbest.manager import CheckpointManager
from keepbest.manifest import FileEntry, Manifest, MonitorRecord
from keepbest.payload import TensorPayload
from keepbest.policy import KeepBest, KeepEvery, KeepLast, KeepPeriod, MaxBytes, Monitor
from keepbest.store import LocalStore, Store
from keepbest.writer import AsyncWriter, SaveHandle

__all__ = [
    "AsyncSaveError",
    "AsyncWriter",
    "Checkpoint",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "FileEntry",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "KeepPeriod",
    "KeepbestError",
    "LocalStore",
    "Manifest",
    "MaxBytes",
    "Monitor",
    "MonitorError",
    "MonitorRecord",
    "PublishError",
    "SaveHandle",
    "StateMismatchError",
    "StorageError",
    "Store",
    "TensorPayload",
    "__version__",
    "list_checkpoints",
]
