"""Which saved tensor goes into which variable, and the PyTorch-style report when they do not fit.

Framework-free: adapters pass names (variable paths), shapes and dtypes and
assign the pairs themselves. Matching is by name when the saved and current
names are the same set, else by position (frameworks rename layers with
automatic suffixes; positions do not change for one architecture), after
checking every shape and dtype. Anything else raises
:class:`~keepbest.errors.StateMismatchError` listing missing and unexpected
keys, as ``torch.nn.Module.load_state_dict`` does.

Example:
    >>> import numpy as np
    >>> spec = (2,), np.dtype("float32")
    >>> match_all(["a/dense/kernel"], {"a/dense/kernel": spec}, ["b/dense_1/kernel"], [spec], "weights", "f")
    [('a/dense/kernel', 0)]
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Mapping, Sequence

import numpy as np

from keepbest.errors import StateMismatchError

Spec = tuple[tuple[int, ...], np.dtype[Any]]
_SUFFIX = re.compile(r"_\d+(?=_|/|$)")


def leaf(path: str) -> str:
    """A path's layer/variable part without automatic ``_N`` suffixes.

    Paths depend on the name scope a variable was created in (a model
    rebuilt from its config has ``dense/kernel`` where the original had
    ``sequential/dense_3/kernel``), so only this part is compared.
    """
    return "/".join(_SUFFIX.sub("", part) for part in path.split("#")[0].split("/")[-2:])


def match_all(saved_order: Sequence[str], saved: Mapping[str, Spec], targets: Sequence[str],
              specs: Sequence[Spec], what: str, where: str) -> list[tuple[str, int]]:
    """``(saved name, target index)`` for every target, all or nothing.

    Raises StateMismatchError naming missing/unexpected keys, or every
    shape/dtype that differs, before anything is assigned.
    """
    if set(targets) == set(saved):
        pairs = [(p, i) for i, p in enumerate(targets)]
    elif len(saved_order) == len(targets):
        pairs = [(p, i) for i, p in enumerate(saved_order)]
    else:
        want, have = Counter(leaf(p) for p in targets), Counter(leaf(p) for p in saved_order)
        missing = [p for p in targets if _take(want - have, leaf(p))]
        unexpected = [p for p in saved_order if _take(have - want, leaf(p))]
        raise StateMismatchError(
            f"Error(s) in loading {what} from {where}: the checkpoint has {len(saved)} variables, "
            f"the model {len(targets)}. Missing key(s) in checkpoint: {names(missing)}. "
            f"Unexpected key(s) in checkpoint: {names(unexpected)}. "
            "Build the same architecture as the one that was saved. "
            f"Received: {len(saved)} saved tensors for {len(targets)} variables"
        )
    wrong = [f"{p}: checkpoint {describe(saved[p])}, model {describe(specs[i])}"
             for p, i in pairs if not same(saved[p], specs[i])]
    if wrong:
        raise StateMismatchError(
            f"Error(s) in loading {what} from {where}: size or dtype mismatch for "
            f"{len(wrong)} variable(s): {'; '.join(wrong[:20])}. Build the model with the saved "
            "shapes and dtypes. Received: the mismatches above"
        )
    return pairs


def match_some(saved_order: Sequence[str], saved: Mapping[str, Spec], targets: Sequence[str],
               specs: Sequence[Spec]) -> tuple[list[tuple[str, int]], list[str]]:
    """The pairs whose name (or layer/variable part, in order), shape and dtype match (a partial restore),
    and a description of each target left as it was."""
    by_leaf: dict[str, list[str]] = {}
    for p in saved_order:
        by_leaf.setdefault(leaf(p), []).append(p)
    pairs, skipped = [], []
    for i, path in enumerate(targets):
        candidates = by_leaf.get(leaf(path), [])
        name = path if path in saved else (candidates[0] if candidates else None)
        if name in candidates:
            candidates.remove(name)
        if name is None or name not in saved:
            skipped.append(f"{path} (not in the checkpoint)")
        elif not same(saved[name], specs[i]):
            skipped.append(f"{path} (checkpoint {describe(saved[name])}, model {describe(specs[i])})")
        else:
            pairs.append((name, i))
    return pairs, skipped


def spec_of(array: np.ndarray) -> Spec:
    return tuple(array.shape), np.dtype(array.dtype)


def same(a: Spec, b: Spec) -> bool:
    return tuple(a[0]) == tuple(b[0]) and np.dtype(a[1]) == np.dtype(b[1])


def describe(spec: Spec) -> str:
    return f"{tuple(spec[0])} {np.dtype(spec[1])}"


def _take(counts: Counter[str], key: str) -> bool:
    """Consumes one ``key`` from ``counts``; True if there was one."""
    if counts[key] > 0:
        counts[key] -= 1
        return True
    return False


def names(paths: Sequence[str]) -> str:
    if not paths:
        return "none"
    shown = ", ".join(f'"{p}"' for p in paths[:20])
    return shown + (f" and {len(paths) - 20} more" if len(paths) > 20 else "")
