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
import posixpath
from typing import Any, Mapping, Protocol, Sequence

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
    pieces: Mapping[str, Mapping[str, Sequence[int]]] | None = None
    """Per file, the variables this process holds as pieces (named by ``codec.piece_name``): path -> whole shape."""
    process_json: Mapping[str, Any] | None = None
    """JSON files whose content differs per process (RNG states): process ``r`` > 0 writes ``name.p<r>.json``."""
    known: Mapping[str, Mapping[str, Sequence[Any]]] | None = None
    """Per file, tensors this process holds but did not copy, because another process writes them (it did
    at the previous save): name -> [shape, dtype code, bytes]."""

    def write(self, staged: Staged) -> tuple[FileEntry, ...]:
        entries = []
        base = {e.path: e for e in self.base.files} if self.base is not None else {}
        for fname, tensors in self.tensors.items():
            main, shards = codec.plan_shards(tensors, (self.groups or {}).get(fname))
            metadata = dict((self.metadata or {}).get(fname) or {})
            names = [codec.shard_name(fname, i + 1) for i in range(len(shards))]
            if names:
                metadata[codec.SHARDS_KEY] = json.dumps(names)
            labels = (self.groups or {}).get(fname)
            if labels:  # which tensors are trainable or frozen, for `keepbest show`
                by_label: dict[str, list[str]] = {}
                for name in tensors:
                    by_label.setdefault(str(labels.get(name, "")), []).append(name)
                metadata[codec.GROUPS_KEY] = json.dumps(by_label, separators=(",", ":"))
            for shard, members in zip(names, shards):
                entries.append(self._write_or_link(staged, shard, codec.encode({k: tensors[k] for k in members}),
                                                   base.get(shard)))
            entries.append(self._write_or_link(staged, fname, codec.encode({k: tensors[k] for k in main}, metadata),
                                               base.get(fname)))
        entries.extend(self._write_json(staged, 0))
        return tuple(sorted(entries, key=lambda e: e.path))

    def _write_json(self, staged: Staged, rank: int) -> list[FileEntry]:
        docs = {**(self.json_files or {})} if rank == 0 else {}
        docs.update({process_file(f, rank): doc for f, doc in (self.process_json or {}).items()})
        return [staged.write(f, json.dumps(doc, indent=1, sort_keys=True).encode("utf-8")) for f, doc in docs.items()]

    # -- written by many processes (see keepbest.manager and keepbest.distributed) ------------------
    def held(self) -> dict[str, dict[str, list[Any]]]:
        """What this process holds: per file, tensor name -> [shape, dtype code, bytes]."""
        out: dict[str, dict[str, list[Any]]] = {}
        for fname, tensors in self.tensors.items():
            out[fname] = {}
            for name, arr in tensors.items():
                a = np.asarray(arr) if not hasattr(arr, "dtype") else arr
                out[fname][name] = [list(a.shape), codec.dtype_code(a.dtype), int(a.nbytes)]
        for fname, specs in (self.known or {}).items():
            out.setdefault(fname, {}).update({name: list(spec) for name, spec in specs.items()})
        return out

    def write_part(self, staged: Staged, rank: int, owned: Mapping[str, Sequence[str]]
                   ) -> tuple[list[FileEntry], dict[str, list[str]]]:
        """Writes the tensors process ``rank`` owns into shard files of its own (and its per-process JSON);
        returns their entries and, per file, the shard file names."""
        entries: list[FileEntry] = []
        shards: dict[str, list[str]] = {}
        base = {e.path: e for e in self.base.files} if self.base is not None else {}
        for fname, tensors in self.tensors.items():
            missing = sorted(set(owned.get(fname, ())) - set(tensors))
            if missing:
                raise RuntimeError(
                    f"Cannot write tensor '{missing[0]}' of {fname}: this process now writes it, but did not copy it "
                    "(another process wrote it at the previous save and no longer holds it). Save again: the next "
                    f"save copies every tensor. Received: {len(missing)} tensor(s) not copied")
            mine = {k: tensors[k] for k in owned.get(fname, ())}
            small, large = codec.plan_shards(mine, (self.groups or {}).get(fname))
            groups = ([small] if small else []) + large  # the small tensors together, the large by group and size
            stem = fname[: -len(".safetensors")] if fname.endswith(".safetensors") else fname
            names = [codec.shard_name(f"{stem}-p{rank:05d}", i + 1) for i in range(len(groups))]
            folder = posixpath.dirname(fname)
            for shard, members in zip(names, groups):
                rel = posixpath.join(folder, shard)
                entries.append(self._write_or_link(staged, rel, codec.encode({k: mine[k] for k in members}),
                                                   base.get(rel)))
            shards[fname] = names
        entries.extend(self._write_json(staged, rank))
        return entries, shards

    def write_index(self, staged: Staged, files: Mapping[str, Mapping[str, str]], shards: Mapping[str, Sequence[str]],
                    pieces: Mapping[str, Mapping[str, Sequence[int]]]) -> list[FileEntry]:
        """The committer's last write: each of ``files`` (any process's, with its metadata) as an index of
        every process's shards, with the whole shapes of the variables saved as pieces."""
        entries = []
        for fname, meta in files.items():
            metadata = dict(meta)
            metadata[codec.SHARDS_KEY] = json.dumps(list(shards.get(fname, ())))
            if pieces.get(fname):
                metadata[codec.PIECES_KEY] = json.dumps({p: list(s) for p, s in sorted(pieces[fname].items())})
            entries.append(staged.write(fname, codec.encode({}, metadata).pieces))
        return entries

    def _write_or_link(self, staged: Staged, rel: str, encoded: codec.Encoded,
                       previous: FileEntry | None) -> FileEntry:
        digest = None
        if previous is not None and previous.size == encoded.size and previous.algorithm == _digest.DEFAULT:
            digest = encoded.digest()
            # The store re-hashes the committed file first: a damaged one is written afresh, never inherited.
            if digest == previous.digest and self.base is not None and staged.link(rel, self.base, previous):
                return FileEntry(path=rel, size=encoded.size, digest=digest)
        return staged.write(rel, encoded.pieces, digest)


def process_file(fname: str, rank: int) -> str:
    """The name of process ``rank``'s copy of a per-process file (``training.json`` -> ``training.p00001.json``)."""
    if rank == 0:
        return fname
    stem, dot, ext = fname.rpartition(".")
    return f"{stem}.p{rank:05d}.{ext}" if dot else f"{fname}.p{rank:05d}"


def owners(held: Sequence[Mapping[str, Mapping[str, Sequence[Any]]]],
           previous: Mapping[tuple[str, str], int] | None = None) -> list[dict[str, list[str]]]:
    """Per process (in process order), per file, the tensors it writes.

    ``held[r]`` is what process ``r`` holds: ``{file: {name: [shape, dtype, bytes]}}``. A tensor keeps
    its ``previous`` owner (``(file, name) -> process``) while that process holds it, so a process can
    leave out of its next snapshot what the others write. Raises ValueError when two processes hold one
    name with different shapes or dtypes.
    """
    holders: dict[tuple[str, str], list[int]] = {}
    specs: dict[tuple[str, str], tuple[Any, ...]] = {}
    for rank, files in enumerate(held):
        for fname, tensors in files.items():
            for name, spec in tensors.items():
                key = (fname, name)
                shape, dtype, nbytes = spec
                if key in specs and specs[key] != (list(shape), dtype, nbytes):
                    other = holders[key][0]
                    raise ValueError(
                        f"Cannot save tensor '{name}' of {fname}: process {other} holds it with shape/dtype "
                        f"{specs[key][0]}/{specs[key][1]} and process {rank} with {list(shape)}/{dtype}. A tensor "
                        "held by several processes must be the same replicated tensor; name per-process shards "
                        f"apart (e.g. with the process index). Received: {name}")
                specs[key] = (list(shape), dtype, nbytes)
                holders.setdefault(key, []).append(rank)
    load = [0] * len(held)
    out: list[dict[str, list[str]]] = [{fname: [] for fname in files} for files in held]
    kept = {key: (previous or {})[key] for key in specs if (previous or {}).get(key, -1) in holders[key]}
    for key, rank in kept.items():
        load[rank] += specs[key][2]
        out[rank].setdefault(key[0], []).append(key[1])
    for key in sorted((k for k in specs if k not in kept), key=lambda k: (-specs[k][2], k)):
        rank = min(holders[key], key=lambda r: (load[r], r))
        load[rank] += specs[key][2]
        out[rank].setdefault(key[0], []).append(key[1])
    for mine in out:
        for names in mine.values():
            names.sort()
    return out
