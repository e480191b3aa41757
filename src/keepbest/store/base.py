"""The storage contract: what every backend (local folder, object store) does, and nothing more.

A store is one folder (or one bucket prefix) of checkpoints. Everything
keepbest persists goes through it:

- **checkpoints**: :meth:`Store.stage` gives a :class:`Staged` entry that a
  payload fills; :meth:`Store.commit` makes it visible at once, with its
  manifest as the commit record; :meth:`Store.list` returns what is
  committed *and present*; :meth:`Store.reader` opens a committed one;
  :meth:`Store.delete` un-commits first, then removes the data;
  :meth:`Store.verify` re-hashes; :meth:`Store.recover` finishes or undoes
  what dead writers left, and :meth:`Store.orphans` lists it;
- **records**: small documents (aliases, evaluator leases, evaluation
  results, end-of-training markers, history) read and written with
  compare-and-swap (:meth:`Store.read_record`, :meth:`Store.write_record`),
  so two writers never lose each other's update;
- **upload snapshots** (:meth:`Store.snapshot`): a stable local copy of a
  committed checkpoint for a publisher that uploads it later;
- **watching** (:meth:`Store.watch`): wait until something may have changed.

Nothing in the contract needs a rename: an object store commits by writing
the manifest last with ``If-None-Match: *`` and compares records with
``If-Match``. The local backend (:mod:`keepbest.store.local`) keeps the
temp-sibling, fsync, ``os.replace`` protocol. Every backend passes the
same contract suite (``tests/store/contract.py``).
"""

from __future__ import annotations

import abc
import builtins
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Sequence

from keepbest.errors import KeepbestError
from keepbest.manifest import FileEntry, Manifest


class RecordConflictError(KeepbestError, RuntimeError):
    """A record changed since it was read (compare-and-swap lost); read it again and retry."""


ANY = "*"
"""``expect=ANY``: write a record whatever it holds now."""


@dataclass(frozen=True)
class Record:
    """A small stored document and the token that :meth:`Store.write_record` compares."""

    key: str
    data: bytes
    token: str

    def json(self) -> Any:
        return json.loads(self.data.decode("utf-8"))


@dataclass(frozen=True)
class Damaged:
    """A checkpoint that cannot be used: its manifest is unreadable, or its data is missing or incomplete."""

    name: str
    reason: str
    manifest: Manifest | None = None
    """The manifest when it could be read (the data is what is wrong)."""


@dataclass
class Listing:
    """Committed checkpoints whose data is present, and those that cannot be used (with why)."""

    manifests: list[Manifest] = field(default_factory=list)
    damaged: list[Damaged] = field(default_factory=list)
    unmanaged: list[str] = field(default_factory=list)
    """Model files at the top level that no manifest describes (``model.keras`` saved by Keras itself):
    keepbest cannot vouch for them, so they are named, never listed as checkpoints."""


@dataclass
class Recovery:
    """What :meth:`Store.recover` found and did."""

    rolled_forward: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    """Manifests removed because every file they describe is gone (deleted by hand)."""
    undecided: list[str] = field(default_factory=list)
    """Leftovers whose writer may be alive (another host or PID namespace): left alone."""

    @property
    def changed(self) -> bool:
        return bool(self.rolled_forward or self.rolled_back or self.restored or self.removed or self.stale)


@dataclass
class Orphans:
    """Leftovers of writers: ``dead`` ones (safe to remove) and ``undecided`` ones (never removed), and
    ``stale`` manifests (names of checkpoints whose data was deleted by hand)."""

    dead: list[str] = field(default_factory=list)
    undecided: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)


class Staged(abc.ABC):
    """One checkpoint being written, invisible until :meth:`Store.commit`."""

    name: str
    layout: str

    @abc.abstractmethod
    def local_path(self) -> Path:
        """A local path for a framework's own writer: the file to create (``file``), or the folder (``dir``)."""

    @abc.abstractmethod
    def write(self, rel: str, data: bytes | Sequence[memoryview], digest: str | None = None) -> FileEntry:
        """Writes one file of a ``dir`` checkpoint, or (``rel`` = its name) the one file of a ``file``
        checkpoint; returns its entry (the digest computed on the way)."""

    @abc.abstractmethod
    def link(self, rel: str, base: Manifest, entry: FileEntry) -> bool:
        """Reuses the committed file ``entry`` of ``base`` as ``rel`` without writing it (dedup).

        True when done; False when the backend cannot, or the committed file
        no longer verifies (a damaged file is never inherited): write it then.
        """

    @abc.abstractmethod
    def free_bytes(self) -> int | None:
        """Free space where the data is written, None where unbounded or unknown."""

    def handle(self) -> dict[str, Any]:
        """A JSON-able description of this staged entry, for :meth:`Store.join` in another process (that
        writes files of its own into it: many processes, one commit). Discarding it then also removes
        what the other processes wrote."""
        raise NotImplementedError(f"{type(self).__name__} cannot be shared with other processes")


class Reader(abc.ABC):
    """Reads the files of one committed checkpoint."""

    manifest: Manifest

    @abc.abstractmethod
    def buffer(self, rel: str, private: bool = False) -> Any:
        """The bytes of file ``rel`` as a read-only buffer (memory-mapped where the backend can).

        With ``private``, a copy-on-write view instead: writable, but what is written stays in this process
        and never reaches the file (a page is copied when it is first written). Restored optimizer state can
        then live on it without a copy up front, as ``torch.load(mmap=True)`` leaves it."""

    @abc.abstractmethod
    def read_range(self, rel: str, offset: int, length: int) -> bytes:
        """``length`` bytes of ``rel`` from ``offset`` (fewer at the end of the file)."""

    @abc.abstractmethod
    def local_path(self) -> Path:
        """The checkpoint as a local file or folder, for a framework's own reader."""

    @abc.abstractmethod
    def where(self, rel: str | None = None) -> str:
        """The path or URL of the checkpoint (or of its file ``rel``), for messages."""

    def read(self, rel: str) -> bytes:
        return bytes(self.buffer(rel))

    def open(self, rel: str) -> BinaryIO:
        """File ``rel`` as a seekable, read-only binary file (for readers such as ``zipfile`` and ``h5py``)."""
        return io.BufferedReader(BufferFile(self.buffer(rel)))

    def has(self, rel: str) -> bool:
        return any(f.path == rel for f in self.manifest.files)


class BufferFile(io.RawIOBase):
    """A read-only file over a buffer (a memory map), without copying it."""

    def __init__(self, buffer: Any) -> None:
        self._view = memoryview(buffer).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._view.nbytes}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self._view.nbytes - self._pos))
        b[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n


class Watch(abc.ABC):
    """Waits until the store may have changed."""

    @abc.abstractmethod
    def wait(self, timeout: float) -> bool:
        """Returns within ``timeout`` seconds; False only when nothing changed for sure."""

    def close(self) -> None:
        """Lets go of what the watch holds."""

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Store(abc.ABC):
    """Checkpoints and records of one folder or bucket prefix (see the module docstring)."""

    url: str
    """Where the store is: an absolute local path, or a URL."""

    # -- where ----------------------------------------------------------------------------
    @abc.abstractmethod
    def where(self, name: str | None = None) -> str:
        """The path or URL of the store, or of checkpoint ``name`` in it, for messages."""

    @abc.abstractmethod
    def exists(self) -> bool:
        """Whether the folder (prefix) exists at all."""

    @abc.abstractmethod
    def entry_kind(self) -> str | None:
        """What the store's own location is: ``"file"`` or ``"dir"`` when it is itself one checkpoint
        (a Keras file, or a folder with a manifest inside), else None (a folder of checkpoints)."""

    @abc.abstractmethod
    def parent(self) -> "Store":
        """The store one level up (for a location that is itself a checkpoint)."""

    @property
    def basename(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def check_name(self, name: str) -> None:
        """Raises ValueError when ``name`` cannot name a checkpoint here."""
        from keepbest.store import _names

        why = _names.check_name(name)
        if why is not None:
            raise ValueError(f"Checkpoint name {name!r} is not a plain file or folder name, or is reserved by "
                             f"keepbest: {why}. Pass a name without '/' or '..'. Received: name={name!r}")

    # -- checkpoints ----------------------------------------------------------------------
    @abc.abstractmethod
    def stage(self, name: str, layout: str) -> Staged:
        """A fresh, invisible entry for checkpoint ``name`` (``layout`` is ``"file"`` or ``"dir"``)."""

    @abc.abstractmethod
    def commit(self, staged: Staged, manifest: Manifest) -> Manifest:
        """Makes ``staged`` visible as ``manifest.name``, replacing a committed one of that name only
        once the new one is complete; returns the committed manifest (files hashed here when
        ``manifest.files`` is empty). On any failure ``staged`` is discarded and nothing changes."""

    @abc.abstractmethod
    def discard(self, staged: Staged) -> None:
        """Removes a staged entry that will not be committed."""

    def join(self, handle: Mapping[str, Any]) -> Staged:
        """The ``dir`` entry that another process staged (:meth:`Staged.handle`), to write files into.

        Only its stager commits or discards it; the files written here go in
        its manifest when the stager lists them.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot write into another process's staged entry")

    @abc.abstractmethod
    def list(self) -> Listing:
        """Every committed checkpoint whose data is present, and the damaged ones."""

    @abc.abstractmethod
    def reader(self, manifest: Manifest) -> Reader:
        """Opens committed checkpoint ``manifest`` for reading."""

    @abc.abstractmethod
    def verify(self, manifest: Manifest, progress: Callable[[int], None] | None = None) -> None:
        """Re-hashes every file of ``manifest``; ``progress(nbytes)`` is called after each file verifies.

        Raises :class:`~keepbest.errors.CorruptCheckpointError` naming the file
        that is missing or differs, or
        :class:`~keepbest.errors.CheckpointNotFoundError` when the checkpoint
        was deleted or saved again meanwhile (it is gone, not damaged).
        """

    def verified_reader(self, manifest: Manifest) -> Reader:
        """A reader of ``manifest`` whose files were verified first (raises as :meth:`verify` does).

        For a load: an object store verifies while it downloads into its read cache, so nothing is read twice.
        """
        self.verify(manifest)
        return self.reader(manifest)

    @abc.abstractmethod
    def delete(self, manifest: Manifest) -> None:
        """Removes a committed checkpoint: un-commits it first, then removes its data."""

    @abc.abstractmethod
    def replacing(self, name: str) -> bool:
        """Whether a live writer is half-way through committing ``name`` (a mismatch is not damage)."""

    @abc.abstractmethod
    def orphans(self) -> Orphans:
        """Leftovers of writers that died (and of writers whose liveness cannot be known here)."""

    @abc.abstractmethod
    def recover(self) -> Recovery:
        """Finishes or undoes what dead writers left half done, and removes stale manifests. Idempotent."""

    # -- records ----------------------------------------------------------------------------
    @abc.abstractmethod
    def record_key(self, *parts: str) -> str:
        """The key of a record from its parts (any text: quoted and shortened as the backend needs)."""

    @abc.abstractmethod
    def read_record(self, key: str) -> Record | None:
        """The record stored at ``key``, or None."""

    @abc.abstractmethod
    def write_record(self, key: str, data: bytes, *, expect: str | None = ANY) -> str:
        """Stores ``data`` at ``key`` durably and atomically; returns its new token.

        ``expect`` is the token the caller read (the write happens only if the
        record is unchanged), ``None`` (only if there is no record yet) or
        :data:`ANY`. Raises :class:`RecordConflictError` otherwise.
        """

    @abc.abstractmethod
    def delete_record(self, key: str, *, expect: str | None = ANY) -> None:
        """Removes the record at ``key`` (nothing if absent), with ``expect`` as in :meth:`write_record`."""

    @abc.abstractmethod
    def list_records(self, prefix: str) -> builtins.list[str]:
        """The keys of the records directly under ``prefix`` (a key made by :meth:`record_key`)."""

    @abc.abstractmethod
    def set_aside(self, key: str) -> str | None:
        """Moves a damaged record to a new key under ``damaged/`` (never overwritten); returns that key,
        or None when there was no record."""

    @abc.abstractmethod
    def record_where(self, key: str) -> str:
        """The path or URL of record ``key``, for messages."""

    def update_record(self, key: str, change: Callable[[Record | None], bytes | None], *,
                      attempts: int = 50) -> Record | None:
        """Read-modify-write with compare-and-swap: ``change(current)`` gives the new bytes (None: leave it).

        Retried while another writer changed the record in between.
        """
        for _ in range(attempts):
            current = self.read_record(key)
            data = change(current)
            if data is None:
                return current
            try:
                token = self.write_record(key, data, expect=None if current is None else current.token)
            except RecordConflictError:
                continue
            return Record(key, data, token)
        raise RecordConflictError(
            f"Cannot update record {key} in {self.where()}: it changed {attempts} times while it was being "
            "updated (another process writes it in a loop). Retry later. Received: attempts={attempts}")

    # -- uploads and watching ------------------------------------------------------------------
    @abc.abstractmethod
    def snapshot(self, manifest: Manifest) -> Path:
        """A local copy of committed checkpoint ``manifest`` that stays valid until :meth:`release`."""

    @abc.abstractmethod
    def release(self, snapshot: Path) -> None:
        """Frees a snapshot made by :meth:`snapshot`."""

    @abc.abstractmethod
    def watch(self, poll_interval: float = 0.5, records: Sequence[str] = ()) -> Watch:
        """A :class:`Watch` that returns soon after a commit or a delete, or a change of the records under
        the keys ``records`` (prefixes made by :meth:`record_key`)."""

    @abc.abstractmethod
    def remove_if_empty(self) -> None:
        """Removes the store's folder if nothing is left in it (no checkpoint, no record)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Store) and type(other) is type(self) and other.url == self.url

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.url))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def json_bytes(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, indent=1, sort_keys=True).encode("utf-8")
