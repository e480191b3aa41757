"""Finding committed checkpoints: what a location holds, with the best of each series, aliases and
evaluations marked, and which of them may be loaded.

Example:
    >>> import numpy as np, tempfile
    >>> from keepbest import CheckpointManager
    >>> mgr = CheckpointManager(tempfile.mkdtemp())
    >>> _ = mgr.save(1, {"w": np.zeros(2)})
    >>> [(c.name, c.aliases) for c in list_checkpoints(mgr.url)]
    [('ckpt-000000001', ('latest',))]
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from keepbest import evaluation, store as stores
from keepbest.checkpoint import Checkpoint, bests, in_commit_order
from keepbest.errors import CheckpointNotFoundError, CorruptCheckpointError
from keepbest.series import SeriesIndex
from keepbest.store import Damaged, Store


@dataclass
class Found:
    """What a location holds: its store, the checkpoint it names (if it is one), the usable checkpoints
    and the damaged ones."""

    store: Store
    name: str | None
    checkpoints: list[Checkpoint]
    damaged: list[Damaged] = field(default_factory=list)
    unmanaged: list[str] = field(default_factory=list)
    """Model files without a keepbest manifest (saved by Keras or torch directly), when a folder was asked."""

    def unmanaged_note(self) -> str | None:
        """What to tell a user whose folder holds model files keepbest did not write (None when none)."""
        if not self.unmanaged:
            return None
        shown = ", ".join(self.unmanaged[:5]) + (", ..." if len(self.unmanaged) > 5 else "")
        return (f"{len(self.unmanaged)} model file(s) without keepbest manifests in {self.store.where()} ({shown}): "
                "they were not saved by keepbest, so they have no digests to verify and no metrics to list. Load "
                "one by its own path (keras.models.load_model, torch.load), or save with keepbest to manage them.")


def find(location: str | os.PathLike[str] | Store, storage_options: Mapping[str, Any] | None = None) -> Found:
    """The checkpoints at ``location``: one checkpoint (a folder with its manifest, a Keras file), or a
    folder holding checkpoints. Oldest first; in each series the best by its recorded monitor is marked."""
    store, name = stores.locate(location, storage_options)
    listing = store.list()
    manifests = listing.manifests
    best = bests(manifests)
    records = {s: SeriesIndex(store, s).current([m for m in manifests if m.series == s])
               for s in {m.series for m in manifests}}
    evaluations = evaluation.read_records(store) if manifests else {}
    ckpts = [Checkpoint(m, store.where(m.name), m.name in best,
                        evaluations=evaluations.get(evaluation.commit_id(m), {}),
                        aliases=tuple(records[m.series].of(m.version)) if m.version is not None else (),
                        store=store)
             for m in in_commit_order(manifests) if name is None or m.name == name]
    damaged = [d for d in listing.damaged if name is None or d.name == name]
    return Found(store, name, ckpts, damaged, listing.unmanaged if name is None else [])


def list_checkpoints(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> list[Checkpoint]:
    """The committed checkpoints at ``path`` (a folder of checkpoints, one checkpoint, or a Keras file).

    Oldest first; in each series the best by its recorded monitor has ``is_best``.
    A checkpoint whose data is missing is not listed.
    """
    return find(path, storage_options).checkpoints


def first_verified(store: Store, candidates: Sequence[Checkpoint], *, wanted: str,
                   failures: Sequence[CorruptCheckpointError] = ()) -> Checkpoint:
    """The first of ``candidates`` whose files verify.

    With one candidate its failure is raised as is. With more (a fallback),
    each that fails is skipped and, once one verifies, a warning names what
    was skipped; ``failures`` are earlier ones to report (a damaged manifest).
    """
    skipped: list[Exception] = list(failures)
    for candidate in candidates:
        try:
            store.verified_reader(candidate.manifest)  # an object store keeps what it verified for the read
        except (CorruptCheckpointError, CheckpointNotFoundError) as e:
            if len(candidates) == 1 and not skipped:
                raise
            skipped.append(e)
            continue
        if skipped:
            warnings.warn(f"Loading {candidate.location} instead of {wanted}, the newest checkpoint that verifies "
                          f"(fallback=True). Skipped: {' | '.join(map(str, skipped))}", UserWarning, stacklevel=3)
        return candidate
    raise CorruptCheckpointError(
        f"No checkpoint for {wanted} verifies, so nothing was loaded (fallback=True tried {len(skipped)}). "
        f"Restore the files from a copy. Received: {' | '.join(map(str, skipped))}"
    )


