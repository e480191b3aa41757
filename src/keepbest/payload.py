"""What writes one checkpoint's bytes into a staged entry of the store.

Example:
    >>> import numpy as np, tempfile
    >>> from keepbest import store
    >>> from keepbest.manifest import Manifest
    >>> folder = store.open(tempfile.mkdtemp())
    >>> staged = folder.stage("ckpt-1", "dir")
    >>> payload = TensorPayload({"state.safetensors": {"w": np.zeros(3, np.float32)}}, json_files={"a.json": {}})
    >>> entries = payload.write(staged)
    >>> [e.path for e in folder.commit(staged, Manifest("ckpt-1", "dir", "tensors", "s").with_files(entries)).files]
    ['a.json', 'state.safetensors']
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import numpy as np

from keepbest import _digest, codec
from keepbest.manifest import FileEntry, Manifest
from keepbest.store import Staged


class Payload(Protocol):
    """Something that writes one checkpoint's bytes into a staged entry.

    A *detached* payload holds its own copy of the state (a snapshot), so its
    ``write`` may run on the writer thread after ``save_async`` returned; any
    other payload is written on the caller's thread and only the commit
    (fsync, hashing where needed, rename, retention) runs in the background.
    """

    @property
    def detached(self) -> bool:
        """True when ``write`` reads nothing the caller may still change."""
        ...

    @property
    def layout(self) -> str:
        """"file": ``write`` creates ``staged.local_path()``; "dir": it writes files into the staged folder."""
        ...

    @property
    def format(self) -> str:
        """What wrote the payload, recorded in the manifest (e.g. "keras", "tensors")."""
        ...

    def write(self, staged: Staged) -> tuple[FileEntry, ...]:
        """Writes the payload; returns file entries when it hashed while writing, else ()."""
        ...


@dataclass(frozen=True)
class TensorPayload:
    """Named safetensors files and JSON files, written into one checkpoint folder.

    Tensors of 1 MiB or more go to shard files beside their file
    (``model-00001.safetensors``, listed in its metadata; ``codec.load``
    reads them back with it), cut where ``groups`` changes (e.g. frozen and
    trainable weights). With ``base`` (the previous checkpoint's manifest), a
    file whose bytes are unchanged is linked to the committed one instead of
    written again: a frozen backbone costs no write. Each checkpoint stays a
    complete folder that loads and verifies alone.
    """

    tensors: Mapping[str, Mapping[str, np.ndarray]]
    json_files: Mapping[str, Any] | None = None
    metadata: Mapping[str, Mapping[str, str]] | None = None
    format: str = "tensors"
    layout: str = "dir"
    detached: bool = False
    groups: Mapping[str, Mapping[str, str]] | None = None
    """Per file, tensor name -> group label; shards never mix groups."""
    base: Manifest | None = None
    """A committed folder checkpoint whose unchanged files may be reused."""

    def write(self, staged: Staged) -> tuple[FileEntry, ...]:
        entries = []
        base = {e.path: e for e in self.base.files} if self.base is not None else {}
        for fname, tensors in self.tensors.items():
            main, shards = codec.plan_shards(tensors, (self.groups or {}).get(fname))
            metadata = dict((self.metadata or {}).get(fname) or {})
            names = [codec.shard_name(fname, i + 1) for i in range(len(shards))]
            if names:
                metadata[codec.SHARDS_KEY] = json.dumps(names)
            for shard, members in zip(names, shards):
                entries.append(self._write_or_link(staged, shard, codec.encode({k: tensors[k] for k in members}),
                                                   base.get(shard)))
            entries.append(self._write_or_link(staged, fname, codec.encode({k: tensors[k] for k in main}, metadata),
                                               base.get(fname)))
        for fname, doc in (self.json_files or {}).items():
            entries.append(staged.write(fname, json.dumps(doc, indent=1, sort_keys=True).encode("utf-8")))
        return tuple(sorted(entries, key=lambda e: e.path))

    def _write_or_link(self, staged: Staged, rel: str, encoded: codec.Encoded,
                       previous: FileEntry | None) -> FileEntry:
        digest = None
        if previous is not None and previous.size == encoded.size and previous.algorithm == _digest.DEFAULT:
            digest = encoded.digest()
            # The store re-hashes the committed file first: a damaged one is written afresh, never inherited.
            if digest == previous.digest and self.base is not None and staged.link(rel, self.base, previous):
                return FileEntry(path=rel, size=encoded.size, digest=digest)
        return staged.write(rel, encoded.pieces, digest)
