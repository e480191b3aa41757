"""The global random generators of Python and NumPy: their state as JSON, and back.

Shared by the framework adapters for an exact resume (a framework's own
generators, torch's say, are added by its adapter).

Example:
    >>> import random
    >>> state = capture()
    >>> first = random.random()
    >>> restore(state)
    >>> random.random() == first and is_valid(state)
    True
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

_WORD = 2**32 - 1


def capture() -> dict[str, Any]:
    """Python's and NumPy's global generator states, as JSON-able values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    return {
        "python": [version, list(internal), gauss],
        "numpy": {"kind": kind, "keys": np.asarray(keys).tolist(), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }


def restore(state: dict[str, Any]) -> None:
    """Sets the generators from what :func:`capture` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np.asarray(np_state["keys"], dtype=np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))


def ints(value: Any, n: int | None = None, low: int | None = None, high: int | None = None) -> bool:
    """A list of ``n`` (any number when None) integers within ``[low, high]``, never booleans."""
    return (isinstance(value, list) and (n is None or len(value) == n)
            and all(isinstance(i, int) and not isinstance(i, bool) and (low is None or i >= low)
                    and (high is None or i <= high) for i in value))


def integer(value: Any, low: int = 0, high: int | None = None) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool) and value >= low
            and (high is None or value <= high))


def is_valid(state: Any) -> bool:
    """Whether ``state`` has the shape and ranges of what :func:`capture` writes (checked before use)."""
    try:
        version, internal, gauss = state["python"]
        np_state = state["numpy"]
        return (version == 3 and ints(internal[:624], 624, 0, _WORD) and integer(internal[624], 0, 624)
                and (gauss is None or isinstance(gauss, float))
                and np_state["kind"] == "MT19937" and ints(np_state["keys"], 624, 0, _WORD)
                and integer(np_state["pos"], 0, 624) and integer(np_state["has_gauss"], 0, 1)
                and isinstance(np_state["cached_gaussian"], (int, float)))
    except (TypeError, KeyError, ValueError, IndexError):
        return False
