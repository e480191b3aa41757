"""The coordinator over the JAX distributed client (``jax.distributed``, ``keras.distribution.initialize``).

Messages go through the key-value store of JAX's coordination service:
the sender sets a key, the receiver waits for it with a deadline. Process 0
deletes the keys of a step once every process has gone past it.
"""

from __future__ import annotations

import time
from typing import Any

from keepbest.distributed._base import COMMITTER, DEFAULT_TIMEOUT, Channel, Coordinator, check_timeout
from keepbest.errors import CoordinationError


class JaxCoordinator(Coordinator):
    """The processes of a JAX job, through its distributed client.

    Args:
        timeout: seconds a process waits for another at each step of a save
            (writing its part included) before it raises
            :class:`~keepbest.errors.CoordinationError`.

    Example:
        >>> import keras  # doctest: +SKIP
        >>> keras.distribution.initialize("10.0.0.1:1234", num_processes=2, process_id=0)  # doctest: +SKIP
        >>> mgr = CheckpointManager("s3://bucket/run", coordinator=JaxCoordinator(timeout=120))  # doctest: +SKIP
    """

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        import jax
        from jax._src import distributed

        self.timeout = check_timeout(timeout)
        self.client: Any = distributed.global_state.client
        if self.client is None:
            raise RuntimeError(
                "JaxCoordinator needs JAX's distributed runtime, which is not initialized in this process. Call "
                "keras.distribution.initialize(...) or jax.distributed.initialize(...) first, on every process. "
                f"Received: jax.process_count()={jax.process_count()}")
        self.rank = jax.process_index()
        self.size = jax.process_count()

    def channel(self, name: str) -> Channel:
        return _JaxChannel(self, name)


class _JaxChannel(Channel):
    coordinator: JaxCoordinator

    def __init__(self, coordinator: JaxCoordinator, name: str) -> None:
        super().__init__(coordinator, name)
        self.client = coordinator.client
        self._cleaned = 0  # steps below this one are deleted

    def _key(self, key: str) -> str:
        return f"keepbest/{self.id}/{key}"

    def _set(self, key: str, data: bytes, about: str) -> None:
        try:
            self.client.key_value_set_bytes(key, data)
        except Exception as e:  # JaxRuntimeError: the service is gone, or the key exists (out of step)
            raise CoordinationError(
                f"Cannot save {about}: process {self.rank} cannot send its message through JAX's coordination "
                "service (it is gone, or the processes are out of step). Restart the job. "
                f"Received: {type(e).__name__}: {str(e)[:200]}") from e

    def _broadcast(self, key: str, data: bytes, about: str) -> bytes:
        if self.committer:
            self._set(self._key(key), data, about)
            return data
        return self._get(self._key(key), COMMITTER, about, key, time.monotonic() + self.coordinator.timeout)

    def _gather(self, key: str, data: bytes, about: str) -> list[bytes] | None:
        if not self.committer:
            self._set(f"{self._key(key)}/{self.rank}", data, about)
            return None
        return self._collect(key, data, about)

    def _all_gather(self, key: str, data: bytes, about: str) -> list[bytes]:
        self._set(f"{self._key(key)}/{self.rank}", data, about)
        return self._collect(key, data, about)

    def _collect(self, key: str, data: bytes, about: str) -> list[bytes]:
        deadline = time.monotonic() + self.coordinator.timeout
        out = [data if r == self.rank else self._get(f"{self._key(key)}/{r}", r, about, key, deadline)
               for r in range(self.size)]
        if self.committer:  # every process has passed the earlier steps: their keys can go
            step = int(key.split("/", 1)[0])
            for old in range(self._cleaned + 1, step):
                self.client.key_value_delete(self._key(str(old)))
            self._cleaned = max(self._cleaned, step - 1)
        return out

    def _get(self, key: str, rank: int, about: str, step: str, deadline: float) -> bytes:
        left_ms = max(1, int((deadline - time.monotonic()) * 1000))
        try:
            return bytes(self.client.blocking_key_value_get_bytes(key, left_ms))
        except Exception as e:  # the client raises XlaRuntimeError (DEADLINE_EXCEEDED, UNAVAILABLE, ...)
            timeout = self.coordinator.timeout
            raise CoordinationError(
                f"Cannot save {about}: process {rank} did not reach step '{step.split('/', 1)[1]}' of the save within "
                f"{timeout:g} s (this is process {self.rank} of {self.size}): it died, hangs or is still writing. "
                "Nothing was committed; the previous checkpoints are intact. Restart the job (it resumes from the "
                "last committed checkpoint), or raise the coordinator's timeout if saves are this slow. "
                f"Received: timeout={timeout:g}, {type(e).__name__}: {str(e)[:200]}") from e
