"""The coordinator over ``torch.distributed``: collectives on a gloo group of each channel's own.

A gloo group works beside any training backend (NCCL included) and carries
the small messages of a save on the CPU; its timeout bounds every wait. Each
channel has its own group, so saves of two series (a ``ModelCheckpoint`` and
a backup) never mix their messages, even from two threads.
"""

from __future__ import annotations

import datetime
from typing import Any

from keepbest.distributed._base import DEFAULT_TIMEOUT, Channel, Coordinator, check_timeout
from keepbest.errors import CoordinationError


class TorchCoordinator(Coordinator):
    """The processes of a ``torch.distributed`` job (initialized with ``init_process_group``).

    Args:
        timeout: seconds a process waits for the others at each step of a
            save (writing its part included) before it raises
            :class:`~keepbest.errors.CoordinationError`.

    Creating a channel (one per :class:`~keepbest.CheckpointManager`) is a
    collective call: construct the managers in the same order on every process.

    Example:
        >>> import torch.distributed as dist  # doctest: +SKIP
        >>> dist.init_process_group("nccl")  # doctest: +SKIP
        >>> mgr = CheckpointManager("s3://bucket/run", coordinator=TorchCoordinator(timeout=120))  # doctest: +SKIP
    """

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        import torch.distributed as dist

        self.timeout = check_timeout(timeout)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "TorchCoordinator needs torch.distributed, which is not initialized in this process. Call "
                "torch.distributed.init_process_group(...) first, on every process. "
                f"Received: is_initialized()={dist.is_available() and dist.is_initialized()}")
        self.rank = dist.get_rank()
        self.size = dist.get_world_size()

    def channel(self, name: str) -> Channel:
        import torch.distributed as dist

        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=self.timeout))
        return _TorchChannel(self, name, group)


class _TorchChannel(Channel):
    coordinator: TorchCoordinator

    def __init__(self, coordinator: TorchCoordinator, name: str, group: Any) -> None:
        super().__init__(coordinator, name)
        self.group = group

    def _broadcast(self, key: str, data: bytes, about: str) -> bytes:
        import torch
        import torch.distributed as dist

        def run() -> bytes:
            framed = _frame(key, data)
            size = torch.tensor([len(framed)], dtype=torch.int64)
            dist.broadcast(size, src=0, group=self.group)
            buf = _tensor(framed) if self.committer else torch.empty(int(size.item()), dtype=torch.uint8)
            dist.broadcast(buf, src=0, group=self.group)
            return _unframe(key, buf.numpy().tobytes(), 0, about)

        return self._call(run, key, about, "process 0")

    def _gather(self, key: str, data: bytes, about: str) -> list[bytes] | None:
        got = self._all_gather(key, data, about)
        return got if self.committer else None

    def _all_gather(self, key: str, data: bytes, about: str) -> list[bytes]:
        import torch
        import torch.distributed as dist

        def run() -> list[bytes]:
            framed = _frame(key, data)
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
            dist.all_gather(sizes, torch.tensor([len(framed)], dtype=torch.int64), group=self.group)
            longest = max(int(s.item()) for s in sizes)
            buf = torch.zeros(longest, dtype=torch.uint8)
            buf[: len(framed)] = _tensor(framed)
            bufs = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.size)]
            dist.all_gather(bufs, buf, group=self.group)
            return [_unframe(key, b[: int(s.item())].numpy().tobytes(), r, about)
                    for r, (b, s) in enumerate(zip(bufs, sizes))]

        return self._call(run, key, about, "another process")

    def _call(self, run: Any, key: str, about: str, whom: str) -> Any:
        try:
            return run()
        except CoordinationError:
            raise
        except Exception as e:  # gloo raises RuntimeError (DistBackendError) on a timeout or a lost peer
            timeout = self.coordinator.timeout
            raise CoordinationError(
                f"Cannot save {about}: {whom} did not reach step '{key.split('/', 1)[1]}' of the save within {timeout:g} "
                f"s, or its connection broke (this is process {self.rank} of {self.size}): it died, hangs or is still "
                "writing. Nothing was committed; the previous checkpoints are intact. Restart the job (it resumes "
                "from the last committed checkpoint), or raise the coordinator's timeout if saves are this slow. "
                f"Received: timeout={timeout:g}, {type(e).__name__}: {str(e)[:200]}") from e


def _frame(key: str, data: bytes) -> bytes:
    return key.encode("utf-8") + b"\0" + data


def _unframe(key: str, framed: bytes, rank: int, about: str) -> bytes:
    head, _, data = framed.partition(b"\0")
    if head != key.encode("utf-8"):
        raise CoordinationError(
            f"Cannot save {about}: process {rank} sent message '{head.decode('utf-8', 'replace')}' where "
            f"'{key}' was expected, so the processes are not at the same save (they save different series in "
            "different orders, or one skipped a save). Call the same saves, in the same order, on every process. "
            f"Received: {head[:80]!r}")
    return data


def _tensor(data: bytes) -> Any:
    import torch

    return torch.frombuffer(bytearray(data), dtype=torch.uint8)
