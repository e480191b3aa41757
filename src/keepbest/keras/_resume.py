"""What an exact resume needs besides weights and optimizer state.

- The random number generators a training step or the data pipeline draws
  from: Python's ``random``, NumPy's global generator (Keras shuffles arrays
  with it on JAX and TensorFlow), torch's CPU generator (its ``DataLoader``
  shuffles with it) when torch is in use, and Keras's seed generators, whose
  states are variables (a ``Dropout`` layer's, and the global one).
- The metric variables, so the running means in the logs of a resumed epoch
  continue where they stopped.
- The state of keepbest's own callbacks, which register with the model.
- A way to skip the batches of an epoch that were already trained: Keras's
  loop always starts an epoch at batch 0, so the first calls of the train
  function are answered without training (the batch is still drawn from the
  data, which keeps the data order).
"""

from __future__ import annotations

import sys
import weakref
from typing import Any, Callable, Protocol

import keras
import numpy as np

from keepbest import rng
from keepbest.keras import _host

SEEDS_FILE = "seeds.safetensors"
METRICS_FILE = "metrics.safetensors"
_GLOBAL_SEED = "global_seed_generator"


class ResumableCallback(Protocol):
    def resume_key(self) -> str: ...
    def resume_state(self) -> dict[str, Any]: ...
    def restore_resume_state(self, state: dict[str, Any]) -> None: ...


# model -> {resume key -> callback}: the callback registered last under a key is the current fit's.
_callbacks: "weakref.WeakKeyDictionary[Any, dict[str, weakref.ref[Any]]]" = weakref.WeakKeyDictionary()
_replaying: "weakref.WeakKeyDictionary[Any, tuple[int, frozenset[str]]]" = weakref.WeakKeyDictionary()


def register(model: keras.Model, callback: ResumableCallback) -> None:
    """Makes ``callback``'s state part of the training state a backup of ``model`` records."""
    _callbacks.setdefault(model, {})[callback.resume_key()] = weakref.ref(callback)


def registered(model: keras.Model) -> dict[str, ResumableCallback]:
    found = {key: ref() for key, ref in _callbacks.get(model, {}).items()}
    return {key: cb for key, cb in found.items() if cb is not None}


def replaying(model: keras.Model, key: str | None = None) -> bool:
    """True if the batch just reported was skipped (already trained before the restart).

    The last skipped batch is not a replay for the callback ``key`` when the
    backup was taken before that callback handled the batch (it came later
    in the callback list): it handles the batch now, as it did, or would
    have, before the restart.
    """
    if model not in _replaying:
        return False
    remaining, pending = _replaying[model]
    return not (remaining == 0 and key in pending)


# -- random number generators ------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """The global generators' states, as JSON: Python's and NumPy's (:mod:`keepbest.rng`), and torch's
    when torch is in use (its ``DataLoader`` shuffles with it)."""
    state = rng.capture()
    torch = sys.modules.get("torch")
    if torch is not None:
        state["torch"] = torch.get_rng_state().tolist()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["torch_cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    rng.restore(state)
    if "torch" in state:
        import torch

        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
        if "torch_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["torch_cuda"]])


def rng_state_is_valid(state: Any) -> bool:
    """The shape and ranges of what :func:`rng_state` writes."""
    try:
        return rng.is_valid(state) and ("torch" not in state or rng.ints(state["torch"], None, 0, 255)) and (
            "torch_cuda" not in state or all(rng.ints(s, None, 0, 255) for s in state["torch_cuda"]))
    except TypeError:
        return False


# -- variables besides weights and optimizer ---------------------------------------------------
def seed_variables(model: keras.Model) -> list[Any]:
    """The model's seed-generator states: variables that are not in ``model.weights``."""
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def global_seed_state() -> list[int] | None:
    """The state of Keras's global seed generator (``seed=None`` draws), if one was created."""
    from keras.src.backend.common import global_state

    generator = global_state.get_global_attribute(_GLOBAL_SEED)
    return None if generator is None else np.asarray(_host.whole(generator.state)).tolist()


def set_global_seed_state(state: list[int] | None) -> None:
    """Creates the global seed generator if needed (it draws from ``random``: set that afterwards)."""
    if state is None:
        return
    from keras.src.random.seed_generator import global_seed_generator

    variable = global_seed_generator().state
    variable.assign(np.asarray(state, dtype=keras.backend.standardize_dtype(variable.dtype)))


def metric_variables(model: keras.Model) -> list[Any]:
    return list(model.metrics_variables)


# -- skipping batches already trained ----------------------------------------------------------
def skip_batches(model: keras.Model, calls: int, logs: dict[str, float], at_backup_point: Callable[[], None],
                 pending: frozenset[str] = frozenset(),
                 on_first_batch: Callable[[Any], None] = lambda batch: None) -> None:
    """Answers the next ``calls`` calls of ``model.train_function`` without training.

    Each skipped call still takes its batches from the data iterator (JAX and
    TensorFlow pass the iterator; torch's loop has already taken the batch),
    so the data order is that of the interrupted run. The logs returned are
    those recorded at the backup. ``at_backup_point`` runs at the end of the
    last skipped call, where the backup was taken: after the data pipeline
    drew this epoch's shuffle, before anything of the next batch (torch's
    ``DataLoader`` draws the next epoch's shuffle before the next call). The
    callbacks in ``pending`` handle the last skipped batch (see :func:`replaying`).
    ``on_first_batch`` gets the first skipped batch (TensorFlow builds the
    compiled metrics only when it traces the first step: they are built from it).
    """
    original = model.train_function
    backend = keras.backend.backend()
    per_call = int(getattr(model, "steps_per_execution", 1) or 1)
    remaining = calls

    def train_function(*args: Any) -> Any:
        nonlocal remaining
        if remaining == 0:
            _replaying.pop(model, None)
            model.train_function = original
            return original(*args)
        first = remaining == calls
        remaining -= 1
        _replaying[model] = (remaining, pending)
        if backend in ("jax", "tensorflow"):
            iterator = args[1] if backend == "jax" else args[0]
            batches = [next(iterator) for _ in range(per_call)]
        else:
            batches = [args[0][0]]  # torch: the loop passes [batch]
        if first:
            on_first_batch(batches[0])
        if remaining == 0:
            at_backup_point()
        return (dict(logs), args[0]) if backend == "jax" else dict(logs)

    if calls > 0:
        model.train_function = train_function
    else:
        at_backup_point()


def stop_skipping(model: keras.Model) -> None:
    _replaying.pop(model, None)
