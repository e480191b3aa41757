"""A plain ``state_dict`` file (``torch.save``, loadable with ``torch.load(weights_only=True)``), to and from keepbest.

Exporting writes through the store like any checkpoint: atomically, with a
manifest and a digest (``keepbest verify`` checks it), into a folder or a
bucket. Importing reads a file that ``torch.save`` wrote with
``torch.load(weights_only=True)``: torch's restricted loader, which builds
tensors and plain containers only and never runs code from the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from keepbest import discovery, store as stores
from keepbest.manifest import FileEntry, Manifest
from keepbest.store import Staged

FORMAT = "torch-state-dict"


@dataclass(frozen=True)
class StateDictFile:
    """A payload: one ``torch.save`` file of a state dict (the whole checkpoint is that file)."""

    state: Mapping[str, Any]
    format: str = FORMAT
    layout: str = "file"
    detached: bool = False

    def write(self, staged: Staged) -> tuple[FileEntry, ...]:
        torch.save(self.state, staged.local_path())  # as it is (a module's _metadata too); hashed at the commit
        return ()


def split(path: str | os.PathLike[str]) -> tuple[str, str]:
    """``(folder, file name)`` of a local path or a URL."""
    text = os.fspath(path)
    if stores.is_url(text):
        head, _, tail = text.rstrip("/").rpartition("/")
        return head, tail
    text = os.path.abspath(os.path.expanduser(text))
    return os.path.dirname(text), os.path.basename(text)


def read(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A ``torch.save`` file's state dict, read with ``torch.load(weights_only=True)`` onto the CPU."""
    found = discovery.find(os.fspath(path), storage_options)
    if found.name is None:
        raise FileNotFoundError(f"No file at {os.fspath(path)} to import. Pass the path of a file written by "
                                f"torch.save(model.state_dict(), path). Received: path={os.fspath(path)}")
    if found.checkpoints:  # one that keepbest exported: verified first
        reader = discovery.first_verified(found.store, found.checkpoints[:1], wanted=os.fspath(path)).reader()
    else:
        reader = found.store.reader(Manifest(found.name, "file", "foreign", series=""))
    state = torch.load(reader.local_path(), weights_only=True, map_location="cpu")
    if not isinstance(state, dict):
        raise TypeError(f"Cannot import {os.fspath(path)}: it holds a {type(state).__name__}, not a state dict. "
                        f"Save model.state_dict() with torch.save. Received: {type(state).__name__}")
    return state
