"""Many processes, one commit: the small interface the save protocol needs from a distributed engine.

With N processes training one model, every process calls the same save.
The decisions (the name, the version, what is best) are made once, by the
*committer* (process 0), and shared; each process writes only the tensors
it owns into the committer's staged entry; the committer gathers every
file's size and digest, and commits one manifest. The engine's own
coordination carries the messages, never a home-made one:

- :class:`~keepbest.distributed.JaxCoordinator`: the JAX distributed
  client's key-value store (``jax.distributed`` / ``keras.distribution``);
- :class:`~keepbest.distributed.TorchCoordinator`: ``torch.distributed``
  collectives on a gloo group of their own (whatever the training backend,
  NCCL included).

A :class:`Channel` carries the messages of one checkpoint series, in order:
every process opens the same channels in the same order and calls the same
operations on each in the same order. Messages are JSON documents. Every
wait is bounded by the coordinator's ``timeout``: a process that died or
hangs is a :class:`~keepbest.errors.CoordinationError` naming who, what and
the timeout, never a hang.

Example:
    >>> solo = Solo()
    >>> channel = solo.channel("runs/a#ckpt")
    >>> channel.broadcast("name", {"name": "ckpt-7"}), channel.gather("files", ["a"])
    ({'name': 'ckpt-7'}, [['a']])
"""

from __future__ import annotations

from typing import Any

from keepbest.distributed._base import COMMITTER, DEFAULT_TIMEOUT, Channel, Coordinator, Solo, check_timeout

def __getattr__(name: str) -> Any:
    # The engines are imported only when their coordinator is asked for.
    if name == "JaxCoordinator":
        from keepbest.distributed._jax import JaxCoordinator

        return JaxCoordinator
    if name == "TorchCoordinator":
        from keepbest.distributed._torch import TorchCoordinator

        return TorchCoordinator
    raise AttributeError(f"module 'keepbest.distributed' has no attribute {name!r}")


__all__ = ["COMMITTER", "Channel", "Coordinator", "DEFAULT_TIMEOUT", "JaxCoordinator", "Solo", "TorchCoordinator",
           "check_timeout"]
