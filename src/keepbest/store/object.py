"""The object-store backend: checkpoints under one bucket prefix (``s3://bucket/run``), through s3fs.

The keys mirror a local folder, so a bucket holds what a disk would:
``<name>`` (a Keras file) with its manifest in ``.keepbest/<name>.json``, or
``<name>/...`` with ``<name>/manifest.json`` (a keepbest folder checkpoint),
and the records in ``.keepbest/``.

Commit, with no rename and no copy of data: the requests that commit (the lock, the manifest, the records)
are the same for any size; uploading costs one PUT per small file, one multipart upload per larger one:

1. ``stage`` takes the name's *commit lock*: ``.keepbest/.keepbest-committing-<hash>.json``, created with
   ``If-None-Match: *`` and naming its owner (host, PID namespace, pid, start time). A second writer of the
   same name is refused at once with a clear error.
2. Data objects are uploaded (multipart, streamed, BLAKE3 computed on the way) to keys no committed
   manifest references: a new name's own keys, or for a re-saved folder checkpoint a fresh sub-folder
   (``files_under``). A Keras file re-saved under its name is overwritten in place, as on disk: its
   manifest, size and digest, and the ETag of the object it replaces, are first written into the lock as
   the *intent*, then the upload completes. Until the object's ETag changes, readers still list the
   previous save; after, a live writer's name is skipped for that instant and a dead one's is damaged
   until ``gc``.
3. The manifest is written with one conditional PUT (``If-None-Match: *`` for a new name, ``If-Match``
   on the previous manifest's ETag for a re-save): the commit. The lock is deleted.

A writer that dies leaves its lock; :meth:`ObjectStore.recover` (``keepbest gc``) rolls a Keras file
forward (the object matches the intent) or back, removes objects no manifest references, aborts
abandoned multipart uploads, and deletes the lock. Deleting removes the manifest first. Records are
read with their ETag and written with ``If-Match`` / ``If-None-Match``.
"""

from __future__ import annotations

import errno
import json
import shutil
import time
import urllib.parse
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from keepbest.errors import CorruptCheckpointError, StorageError
from keepbest.manifest import FileEntry, Manifest
from keepbest.store import _names
from keepbest.store._names import COMMITTING, GENERATION, INDEX, MANIFEST, RESERVED
from keepbest.store._object_files import ObjectReader, ObjectStaged, cached, file_pieces, link, missing, scratch
from keepbest.store._object_io import ACTIVE as _ACTIVE, ACTIVE_LOCK as _ACTIVE_LOCK, Bucket, PreconditionFailed
from keepbest.store._object_recovery import ObjectRecovery
from keepbest.store._object_records import ObjectRecords, PollWatch
from keepbest.store.base import Damaged, Listing, Staged, Store, Watch, json_bytes



def open(url: str, storage_options: Mapping[str, Any] | None = None) -> "ObjectStore":  # noqa: A001
    """The store at ``s3://bucket[/prefix]``; ``storage_options`` go to s3fs (else the AWS environment)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme.lower() != "s3":
        raise ValueError(f"The object-store backend serves s3:// URLs. Received: {url}")
    if not parsed.netloc:
        raise ValueError(f"The URL {url} names no bucket. Pass s3://<bucket>/<prefix>. Received: {url}")
    import s3fs  # the backend's one third-party import; keepbest.store.open() turns its absence into a hint

    fs = s3fs.S3FileSystem(**dict(storage_options or {}))
    prefix = parsed.path.strip("/")
    clean = f"s3://{parsed.netloc}" + (f"/{prefix}" if prefix else "")
    return ObjectStore(Bucket(fs, clean, parsed.netloc, prefix), storage_options)


class ObjectStore(ObjectRecords, ObjectRecovery, Store):
    """Checkpoints and records under one bucket prefix (see the module docstring)."""

    def __init__(self, bucket: Bucket, storage_options: Mapping[str, Any] | None = None) -> None:
        self.bucket = bucket
        self.url = bucket.url
        self.storage_options = dict(storage_options or {})
        self._manifests: dict[tuple[str, str], Manifest | CorruptCheckpointError] = {}
        self._snapshots: set[Path] = set()

    # -- where ----------------------------------------------------------------------------------
    def where(self, name: str | None = None) -> str:
        return self.bucket.where(name or "")

    def data_key(self, name: str, layout: str, files_under: str, rel: str) -> str:
        if layout == "file":
            return name
        return "/".join(p for p in (name, files_under, rel) if p)

    def manifest_key(self, name: str, layout: str) -> str:
        return f"{name}/{MANIFEST}" if layout == "dir" else f"{INDEX}/{_names.manifest_file(name)}"

    def exists(self) -> bool:
        return bool(self.bucket.call("list_objects_v2", None, "list", Prefix=self.bucket.key(""),
                                     MaxKeys=1).get("KeyCount", 0)) if self.bucket.prefix else True

    def entry_kind(self) -> str | None:
        if not self.bucket.prefix:
            return None
        up = self.parent()
        if up.bucket.head(self.basename) is not None:
            return "file"
        if self.bucket.head(MANIFEST) is not None:
            return "dir"
        return None

    def parent(self) -> "ObjectStore":
        prefix = self.bucket.prefix.rsplit("/", 1)[0] if "/" in self.bucket.prefix else ""
        url = f"s3://{self.bucket.bucket}" + (f"/{prefix}" if prefix else "")
        return ObjectStore(Bucket(self.bucket.fs, url, self.bucket.bucket, prefix), self.storage_options)

    # -- the commit lock ----------------------------------------------------------------------------
    def _lock_key(self, name: str) -> str:
        return f"{INDEX}/{_names.commit_lock(name)}"

    def read_lock(self, name_or_key: str) -> tuple[dict[str, Any], str] | None:
        key = name_or_key if name_or_key.startswith(f"{INDEX}/") else self._lock_key(name_or_key)
        got = self.bucket.get(key)
        if got is None:
            return None
        try:
            doc = json.loads(got[0])
        except ValueError:
            doc = {}
        return (doc if isinstance(doc, dict) else {}), got[1]

    def _acquire(self, name: str, layout: str) -> tuple[str, str]:
        key = self._lock_key(name)
        body = json_bytes({"owner": _names.owner_token(), "name": name, "layout": layout,
                           "created": time.time(), "intent": None})
        for _ in range(5):
            try:
                etag = self.bucket.put(key, body, create=True)
            except PreconditionFailed:
                held = self.read_lock(key)
                if held is None:
                    continue
                owner = str(held[0].get("owner", ""))
                mine = owner == _names.owner_token() and (self.url, key) not in _ACTIVE
                if mine or _names.liveness(owner) == _names.DEAD:
                    self.settle(key, held)
                    continue
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(held[0].get("created", 0))))
                raise StorageError(
                    errno.EBUSY,
                    f"Cannot save checkpoint {self.where(name)}: another writer (owner {owner}) is saving it "
                    f"since {since}. Two writers of one checkpoint name would overwrite each other's commits, so "
                    "only the first one commits. Give each process its own file path or save from one process. "
                    f"If no writer runs any more (it ran on another host), delete {self.bucket.where(key)}. "
                    f"Received: name={name!r}", self.where(name))
            with _ACTIVE_LOCK:
                _ACTIVE.add((self.url, key))
            return key, etag
        raise StorageError(errno.EBUSY, f"Cannot take the commit lock of {self.where(name)}: it changed 5 times "
                           f"in a row. Retry. Received: name={name!r}", self.where(name))

    def _release(self, lock: tuple[str, str]) -> None:
        try:
            self.bucket.delete(lock[0], match=lock[1])
        except PreconditionFailed:
            pass  # settled by a gc that judged this writer dead: nothing of ours is left in it
        finally:
            with _ACTIVE_LOCK:
                _ACTIVE.discard((self.url, lock[0]))

    # -- writing ----------------------------------------------------------------------------------
    def stage(self, name: str, layout: str) -> ObjectStaged:
        self.check_name(name)
        lock = self._acquire(name, layout)
        try:
            previous = self._committed(name, layout)
            under = _names.generation() if previous is not None and layout == "dir" else ""
            return ObjectStaged(self, name, layout, lock, under, previous)
        except BaseException:
            self._release(lock)
            raise

    def _committed(self, name: str, layout: str) -> tuple[Manifest, str] | None:
        got = self.bucket.get(self.manifest_key(name, layout))
        if got is None:
            return None
        try:
            return Manifest.from_json(got[0], source=self.where(self.manifest_key(name, layout))), got[1]
        except CorruptCheckpointError:
            return None

    def discard(self, staged: Staged) -> None:
        s = _staged(staged)
        try:
            for entry in s.written:
                self.bucket.delete(s.data_key(entry.path))
            if s.shared:  # and what the other processes wrote (or are still uploading) under the name
                self.settle_leftovers(s.name)
        finally:
            s.cleanup()
            self._release(s.lock)

    def join(self, handle: Mapping[str, Any]) -> ObjectStaged:
        name, lock = str(handle.get("name", "")), handle.get("lock")
        self.check_name(name)
        if handle.get("layout") != "dir" or not isinstance(lock, list) or len(lock) != 2 \
                or not str(lock[0]).startswith(f"{INDEX}/{COMMITTING}"):
            raise ValueError(f"Cannot write into a staged entry of {self.where(name)}: the handle is not one this "
                             f"store gave out for a folder checkpoint. Received: handle={dict(handle)!r}")
        under = str(handle.get("files_under", ""))
        if under and not under.startswith(GENERATION):
            raise ValueError(f"Cannot write into a staged entry of {self.where(name)}: files_under={under!r} is not "
                             f"a generation folder. Received: handle={dict(handle)!r}")
        staged = ObjectStaged(self, name, "dir", (str(lock[0]), str(lock[1])), under, None)
        staged.joined = True
        return staged

    def commit(self, staged: Staged, manifest: Manifest) -> Manifest:
        s = _staged(staged)
        try:
            if manifest.layout == "file":
                manifest = self._upload_file(s, manifest)
            else:
                entries = list(s.written) + [self._upload(s, rel, path) for rel, path in s.local_files()
                                             if rel != MANIFEST]
                if not manifest.files:
                    manifest = manifest.with_files(tuple(sorted(entries, key=lambda e: e.path)))
                manifest = replace(manifest, files_under=s.files_under)
            self._put_manifest(s, manifest)
        except BaseException:
            if s.intent is None:  # nothing of the new save can be visible: undo it
                self.discard(s)
                raise
            # The upload may have replaced the object (its completion may have failed only on the way back):
            # finish or undo the save from its intent now, as gc would; if that fails too, this process's next
            # save of the name (or gc) does it.
            try:
                held = self.read_lock(s.lock[0])
                if held is not None:
                    self.settle(s.lock[0], held)
            finally:
                s.cleanup()
                with _ACTIVE_LOCK:
                    _ACTIVE.discard((self.url, s.lock[0]))
            raise
        s.cleanup()
        if s.previous is not None and s.previous[0].files_under != s.files_under:
            self._remove_files(s.previous[0])  # the re-saved folder's old files: no manifest names them now
        self._release(s.lock)
        return manifest

    def _upload(self, s: ObjectStaged, rel: str, path: Path) -> FileEntry:
        size, digest = self.bucket.upload(s.data_key(rel), file_pieces(path))
        return FileEntry(path=rel, size=size, digest=digest)

    def _upload_file(self, s: ObjectStaged, manifest: Manifest) -> Manifest:
        files = s.local_files()
        if not files:
            raise StorageError(errno.ENOENT, f"Cannot commit {self.where(s.name)}: nothing was written to its "
                               f"local file {s.local_path()}. Received: an empty stage", self.where(s.name))
        out: list[Manifest] = []

        def record_intent(size: int, digest: str) -> None:
            entry = FileEntry(path=s.name, size=size, digest=digest)
            if manifest.files and manifest.files != (entry,):
                raise CorruptCheckpointError(
                    f"Cannot commit {self.where(s.name)}: the uploaded bytes differ from the manifest's "
                    f"(the local file changed while it was uploaded). Received: size={size}, "
                    f"expected={manifest.files[0].size}")
            final = manifest.with_files((entry,))
            # The ETag of the object being replaced: until it changes, the previous save is still whole there.
            replaced = self.bucket.head(s.name) if s.previous is not None else None
            doc = {"owner": _names.owner_token(), "name": s.name, "layout": "file", "created": time.time(),
                   "intent": json.loads(final.to_json()), "replaces": replaced[1] if replaced else None}
            s.lock = (s.lock[0], self.bucket.put(s.lock[0], json_bytes(doc), match=s.lock[1]))
            s.intent = final
            out.append(final)

        self.bucket.upload(s.name, file_pieces(files[0][1]), before_visible=record_intent)
        return out[0]

    def _put_manifest(self, s: ObjectStaged, manifest: Manifest) -> None:
        key = self.manifest_key(s.name, s.layout)
        try:
            if s.previous is None:
                self.bucket.put(key, manifest.to_json(), create=True)
            else:
                self.bucket.put(key, manifest.to_json(), match=s.previous[1])
        except PreconditionFailed:
            raise StorageError(
                errno.EEXIST,
                f"Cannot commit checkpoint {self.where(s.name)}: another writer committed it meanwhile (its "
                "manifest changed while this save held the name's lock, so that writer ignored the lock: an "
                "older keepbest or a hand edit). Its checkpoint is kept. Save under another name. "
                f"Received: name={s.name!r}", self.where(s.name)) from None

    def delete(self, manifest: Manifest) -> None:
        lock = self._acquire(manifest.name, manifest.layout)
        try:
            self.bucket.delete(self.manifest_key(manifest.name, manifest.layout))  # un-commit first
            if manifest.layout == "dir":  # its files, and anything a killed writer left beside them
                for rel in self.bucket.listing(f"{manifest.name}/"):
                    self.bucket.delete(rel)
            else:
                self._remove_files(manifest)
        finally:
            self._release(lock)

    def _remove_files(self, manifest: Manifest) -> None:
        for f in manifest.files:
            self.bucket.delete(self.data_key(manifest.name, manifest.layout, manifest.files_under, f.path))

    # -- reading ----------------------------------------------------------------------------------
    def list(self) -> Listing:
        objects = self.bucket.listing()
        return self.listing_of(objects)

    def listing_of(self, objects: Mapping[str, tuple[int, str]]) -> Listing:
        out = Listing()
        for key in sorted(objects):
            layout = _manifest_layout(key)
            if layout is None:
                if "/" not in key and _names.is_model_file(key) and f"{INDEX}/{_names.manifest_file(key)}" not in objects:
                    out.unmanaged.append(key)
                continue
            shown = key.split("/")[0] if layout == "dir" else key[len(INDEX) + 1 : -len(".json")]
            m = self._manifest(key, objects[key][1])
            if isinstance(m, CorruptCheckpointError):
                out.damaged.append(Damaged(shown, str(m)))
                continue
            if m is None:
                continue
            if m.layout != layout or (layout == "file" and key != self.manifest_key(m.name, "file")):
                out.damaged.append(Damaged(shown, str(CorruptCheckpointError(
                    f"Invalid manifest {self.where(key)}: it describes '{m.name}' ({m.layout}), which is not "
                    "where it is stored. The checkpoint cannot be trusted: delete this manifest. "
                    f"Received: name={m.name!r}"))))
                continue
            if layout == "dir" and m.name != shown:
                m = replace(m, name=shown)
            problem = self._absent(m, objects)
            if layout == "file" and self._lock_key(m.name) in objects:
                replacing = self._being_replaced(m, objects.get(m.name, (0, ""))[1])
                if replacing == "":
                    continue  # a live writer is replacing its data right now: the name is not readable this instant
                problem = replacing or problem
            if problem is None:
                out.manifests.append(m)
            elif not self.gone(m):
                out.damaged.append(Damaged(m.name, problem, m))
        return out

    def _being_replaced(self, m: Manifest, etag: str) -> str | None:
        """Whether the data of file checkpoint ``m`` (its object's ETag now: ``etag``) may already be a newer
        save's (a lock with an intent, and the object changed since): "" while its writer lives, why it is
        unusable when the writer died, None when not."""
        held = self.read_lock(m.name)
        intent = held[0].get("intent") if held is not None else None
        if not isinstance(intent, dict) or intent.get("files") == [
                {"path": f.path, "size": f.size, f.algorithm: f.digest} for f in m.files]:
            return None
        assert held is not None
        if held[0].get("replaces") == etag:
            return None  # the upload never completed: the object is still the one ``m`` describes
        owner = str(held[0].get("owner", "")) if held is not None else ""
        if _names.liveness(owner) != _names.DEAD and not (
                owner == _names.owner_token() and (self.url, self._lock_key(m.name)) not in _ACTIVE):
            return ""
        return (f"Checkpoint {m.name} was being saved again when its writer died, so its object may hold the new "
                f"save while its manifest describes the previous one. `keepbest gc {self.url}` (or the next save "
                "of it) completes or undoes that save. Received: an interrupted re-save")

    def _manifest(self, key: str, etag: str) -> Manifest | CorruptCheckpointError | None:
        """The manifest at ``key`` (parsed once per ETag: a manifest object never changes in place)."""
        found = self._manifests.get((key, etag))
        if found is not None:
            return found
        got = self.bucket.get(key)
        if got is None:
            return None
        try:
            parsed: Manifest | CorruptCheckpointError = Manifest.from_json(got[0], source=self.where(key))
        except CorruptCheckpointError as e:
            parsed = e
        self._manifests[(key, got[1])] = parsed
        return parsed

    def _absent(self, m: Manifest, objects: Mapping[str, tuple[int, str]]) -> str | None:
        for f in m.files:
            key = self.data_key(m.name, m.layout, m.files_under, f.path)
            if key not in objects:
                return (f"Checkpoint {m.name} is incomplete: file {self.where(key)} is missing. Restore it from "
                        "a copy or delete the checkpoint (`keepbest gc` removes the manifest of a file deleted "
                        "by hand). Received: missing object")
            if objects[key][0] != f.size:
                return (f"Checkpoint {m.name} is corrupt: file {self.where(key)} does not match its manifest "
                        "(it was truncated or replaced after it was committed). Load another checkpoint or "
                        f"restore the object. Received: size={objects[key][0]}, expected size={f.size}")
        return None

    def reader(self, manifest: Manifest) -> ObjectReader:
        return ObjectReader(self, manifest)

    def replacing(self, name: str) -> bool:
        held = self.read_lock(name)
        return held is not None and _names.liveness(str(held[0].get("owner", ""))) != _names.DEAD

    def gone(self, manifest: Manifest) -> bool:
        """Whether ``manifest`` is no longer the committed one of its name (deleted, saved again)."""
        now = self._committed(manifest.name, manifest.layout)
        return now is None or _identity(now[0]) != _identity(manifest) or \
            (manifest.layout == "file" and self.replacing(manifest.name))

    def verified_reader(self, manifest: Manifest) -> ObjectReader:
        """Downloads every file into the verified read cache (checked on the way), so a load reads each
        object once: verifying, then reading from the bucket, would download it twice."""
        reader = ObjectReader(self, manifest)
        for f in manifest.files:
            reader.fetch(f.path)
        return reader

    def verify(self, manifest: Manifest, progress: Callable[[int], None] | None = None) -> None:
        for f in manifest.files:
            key = self.data_key(manifest.name, manifest.layout, manifest.files_under, f.path)
            try:
                size, digest = self.bucket.digest(key, f.algorithm)
            except FileNotFoundError:
                raise missing(self.bucket, key, lambda: self.gone(manifest)) from None
            if (size, digest) != (f.size, f.digest):
                if self.gone(manifest):
                    raise missing(self.bucket, key, lambda: True)
                raise CorruptCheckpointError(
                    f"Checkpoint {manifest.name} is corrupt: file {self.where(key)} does not match its manifest "
                    "(it was truncated or modified after it was committed). Load another checkpoint or restore "
                    f"the object. Received: size={size} {f.algorithm}={digest[:16]}..., expected size={f.size} "
                    f"{f.algorithm}={f.digest[:16]}...")
            if progress is not None:
                progress(f.size)

    # -- uploads, watching ------------------------------------------------------------------------------
    def snapshot(self, manifest: Manifest) -> Path:
        dest = scratch("snapshots") / manifest.name
        for f in manifest.files:
            key = self.data_key(manifest.name, manifest.layout, manifest.files_under, f.path)
            source = cached(self.bucket, key, f, lambda: self.gone(manifest))
            link(source, dest if manifest.layout == "file" else dest / f.path)  # cached files never change
        if manifest.layout == "dir":
            (dest / MANIFEST).write_bytes(manifest.to_json())
        self._snapshots.add(dest)
        return dest

    def release(self, snapshot: Path) -> None:
        if snapshot not in self._snapshots:
            raise ValueError(f"{snapshot} is not an upload snapshot of {self.url}. Received: {snapshot}")
        self._snapshots.discard(snapshot)
        shutil.rmtree(snapshot.parent, ignore_errors=True)

    def watch(self, poll_interval: float = 0.5, records: Sequence[str] = ()) -> Watch:
        return PollWatch(self.bucket, poll_interval)

    def remove_if_empty(self) -> None:
        """Nothing to do: a bucket prefix exists only while objects are under it."""


def _manifest_layout(key: str) -> str | None:
    parts = key.split("/")
    if len(parts) == 2 and parts[0] == INDEX and parts[1].endswith(".json") and not parts[1].startswith(RESERVED):
        return "file"
    if len(parts) == 2 and parts[1] == MANIFEST and not parts[0].startswith(RESERVED):
        return "dir"
    return None


def _identity(m: Manifest) -> tuple[object, ...]:
    return m.created, tuple((f.path, f.size) for f in m.files)


def _staged(staged: Staged) -> ObjectStaged:
    if not isinstance(staged, ObjectStaged):
        raise TypeError(f"An ObjectStore commits only what it staged. Received: {staged!r}")
    return staged
