"""Which coordinator the Keras callbacks use: the one passed, else JAX's when its distributed runtime runs."""

from __future__ import annotations

from typing import Any

import keras

from keepbest.distributed import Coordinator

_shared: list[Coordinator] = []


def resolve(coordinator: Any) -> Coordinator | None:
    """``coordinator`` checked; by default a process-wide ``JaxCoordinator`` when JAX runs several processes
    (``keras.distribution.initialize``), else None (one process)."""
    from keepbest.distributed._jax import JaxCoordinator  # (imports JAX only when one is made)

    if coordinator is not None:
        if not isinstance(coordinator, JaxCoordinator):
            raise TypeError("coordinator must be a keepbest.distributed.JaxCoordinator (Keras trains in several "
                            "processes through keras.distribution, on JAX), or None to find it. "
                            f"Received: coordinator={coordinator!r}")
        return coordinator if coordinator.size > 1 else None
    if keras.backend.backend() != "jax":
        return None
    from jax._src import distributed  # asking jax.process_count() would start the backend before initialize()

    if distributed.global_state.client is None:
        return None
    if not _shared:
        _shared.append(JaxCoordinator())
    return _shared[0] if _shared[0].size > 1 else None
