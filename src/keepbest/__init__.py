"""keepbest: crash-safe, fast and inspectable model checkpointing.

The core (this package) is framework-free; ``keepbest.keras`` is the Keras 3
adapter, imported on its own so that the core never pulls a framework in.
"""

__version__ = "0.2.0"

from keepbest.errors import (  # noqa: E402
    AsyncSaveError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    KeepbestError,
    MonitorError,
    PublishError,
    StateMismatchError,
    StorageError,
)
from keepbest.checkpoint import Checkpoint, TensorPayload, list_checkpoints  # noqa: E402
from keepbest.manager import CheckpointManager  # noqa: E402
from keepbest.manifest import FileEntry, Manifest, MonitorRecord  # noqa: E402
from keepbest.policy import KeepBest, KeepLast, Monitor  # noqa: E402
from keepbest.storage import LocalStore  # noqa: E402
from keepbest.writer import AsyncWriter, SaveHandle  # noqa: E402

__all__ = [
    "AsyncSaveError",
    "AsyncWriter",
    "Checkpoint",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "FileEntry",
    "KeepBest",
    "KeepLast",
    "KeepbestError",
    "LocalStore",
    "Manifest",
    "Monitor",
    "MonitorError",
    "MonitorRecord",
    "PublishError",
    "SaveHandle",
    "StateMismatchError",
    "StorageError",
    "TensorPayload",
    "__version__",
    "list_checkpoints",
]
