"""The coordinator interface and the one-process coordinator (see :mod:`keepbest.distributed`)."""

from __future__ import annotations

import abc
import hashlib
import json
from typing import Any

from keepbest.errors import CoordinationError

COMMITTER = 0
DEFAULT_TIMEOUT = 300.0
"""Seconds a process waits for the others at each step of a save (writing included)."""


class Channel(abc.ABC):
    """Ordered messages between the processes of one series (see the module docstring)."""

    def __init__(self, coordinator: "Coordinator", name: str) -> None:
        self.coordinator = coordinator
        self.name = name
        # Channels open in the same order on every process: the count keeps two channels of one name apart.
        coordinator.opened += 1
        self.id = hashlib.blake2s(f"{coordinator.opened}#{name}".encode("utf-8"), digest_size=8).hexdigest()
        self.sequence = 0
        self.broken: str | None = None
        """What was being saved when a process was lost (the processes are out of step since)."""

    @property
    def rank(self) -> int:
        return self.coordinator.rank

    @property
    def size(self) -> int:
        return self.coordinator.size

    @property
    def committer(self) -> bool:
        return self.coordinator.rank == COMMITTER

    def _next(self, tag: str) -> str:
        self.sequence += 1
        return f"{self.sequence}/{tag}"

    def broadcast(self, tag: str, value: Any = None, *, about: str = "") -> Any:
        """The committer's ``value`` (JSON-able), on every process; others pass anything (ignored)."""
        data = _encode(value) if self.committer else b""
        return json.loads(self._run(lambda key: self._broadcast(key, data, about), tag, about))

    def gather(self, tag: str, value: Any, *, about: str = "") -> list[Any] | None:
        """Every process's ``value`` in process order, on the committer; None on the others."""
        got = self._run(lambda key: self._gather(key, _encode(value), about), tag, about)
        return None if got is None else [json.loads(v) for v in got]

    def all_gather(self, tag: str, value: Any, *, about: str = "") -> list[Any]:
        """Every process's ``value`` in process order, on every process."""
        return [json.loads(v) for v in self._run(lambda key: self._all_gather(key, _encode(value), about), tag, about)]

    def _run(self, operation: Any, tag: str, about: str) -> Any:
        if self.broken:
            raise CoordinationError(
                f"Cannot save {about or 'this checkpoint'}: the processes lost each other while saving "
                f"{self.broken}, so they are out of step. Restart every process of the job (training resumes "
                f"from the last committed checkpoint). Received: an earlier failure on process {self.rank}")
        try:
            return operation(self._next(tag))
        except CoordinationError:
            self.broken = about or "a checkpoint"
            raise

    @abc.abstractmethod
    def _broadcast(self, key: str, data: bytes, about: str) -> bytes: ...

    @abc.abstractmethod
    def _gather(self, key: str, data: bytes, about: str) -> list[bytes] | None: ...

    @abc.abstractmethod
    def _all_gather(self, key: str, data: bytes, about: str) -> list[bytes]: ...

    def close(self) -> None:
        """Lets go of what the channel holds in the engine."""


class Coordinator(abc.ABC):
    """The processes of one training job, as an engine sees them."""

    rank: int
    """This process's index (0 is the committer)."""
    size: int
    """How many processes save together."""
    timeout: float
    """Seconds any wait for another process may last before it is an error."""
    opened = 0
    """Channels opened so far (every process opens the same ones, in the same order)."""

    @abc.abstractmethod
    def channel(self, name: str) -> Channel:
        """A new channel for the series ``name`` (the same name, in the same order, on every process)."""

    def describe(self) -> str:
        return f"process {self.rank} of {self.size}"


class Solo(Coordinator):
    """One process: every message returns at once."""

    rank, size, timeout = 0, 1, DEFAULT_TIMEOUT

    def channel(self, name: str) -> Channel:
        return _SoloChannel(self, name)


class _SoloChannel(Channel):
    def _broadcast(self, key: str, data: bytes, about: str) -> bytes:
        return data

    def _gather(self, key: str, data: bytes, about: str) -> list[bytes]:
        return [data]

    def _all_gather(self, key: str, data: bytes, about: str) -> list[bytes]:
        return [data]


def check_timeout(timeout: Any) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError("timeout must be a positive number of seconds (how long a process waits for the others "
                         f"at each step of a save before it raises). Received: timeout={timeout!r}")
    return float(timeout)


def _encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")
