"""Crash recovery of the object-store backend: what dead writers left is finished or removed.

A writer holds its name's commit lock from stage to commit (:mod:`keepbest.store.object`). A lock whose
owner is dead is *settled*: a Keras file whose object matches the intent in the lock is committed (rolled
forward), else the intent is dropped (rolled back); objects under the name that no committed manifest
references are removed, multipart uploads to the name are aborted, and the lock goes. A lock whose owner
cannot be judged from here (another host or PID namespace) is left and reported. Leftover generations of
re-saved folders and uploads that no lock covers are removed too; objects keepbest did not write are never
touched.
"""

from __future__ import annotations

from typing import Any, Mapping

from keepbest.errors import CorruptCheckpointError
from keepbest.manifest import Manifest
from keepbest.store import _names
from keepbest.store._names import COMMITTING, GENERATION, INDEX, MANIFEST, PROBE
from keepbest.store._object_io import ACTIVE, Bucket, PreconditionFailed
from keepbest.store.base import Listing, Orphans, Recovery


class ObjectRecovery:
    """The recovery half of :class:`keepbest.store.object.ObjectStore` (which defines what is declared here)."""

    bucket: Bucket
    url: str

    def where(self, name: str | None = None) -> str:
        raise NotImplementedError

    def read_lock(self, name_or_key: str) -> tuple[dict[str, Any], str] | None:
        raise NotImplementedError

    def listing_of(self, objects: Mapping[str, tuple[int, str]]) -> Listing:
        raise NotImplementedError

    def manifest_key(self, name: str, layout: str) -> str:
        raise NotImplementedError

    def data_key(self, name: str, layout: str, files_under: str, rel: str) -> str:
        raise NotImplementedError

    def _committed(self, name: str, layout: str) -> tuple[Manifest, str] | None:
        raise NotImplementedError

    def _locks(self) -> dict[str, tuple[dict[str, Any], str, str]]:
        """Every commit lock: key -> (its document, its ETag, its owner's liveness)."""
        out = {}
        for rel in self.bucket.listing(f"{INDEX}/{COMMITTING}"):
            held = self.read_lock(rel)
            if held is None:
                continue
            owner = str(held[0].get("owner", ""))
            state = _names.liveness(owner)
            if owner == _names.owner_token() and (self.url, rel) not in ACTIVE:
                state = _names.DEAD  # this process's own failed commit, no longer in progress
            out[rel] = (held[0], held[1], state)
        return out

    def _scan(self) -> tuple[Orphans, dict[str, tuple[dict[str, Any], str, str]], list[tuple[str, str]]]:
        locks = self._locks()
        busy = {str(doc.get("name")) for doc, _etag, state in locks.values() if state != _names.DEAD}
        out = Orphans()
        for key, (_doc, _etag, state) in sorted(locks.items()):
            (out.dead if state == _names.DEAD else out.undecided).append(self.bucket.where(key))
        objects = self.bucket.listing()
        listing = self.listing_of(objects)
        for m in listing.manifests + [d.manifest for d in listing.damaged if d.manifest is not None]:
            if m.layout != "dir" or m.name in busy:
                continue
            for rel in objects:
                parts = rel.split("/")
                if len(parts) > 2 and parts[0] == m.name and parts[1].startswith(GENERATION) \
                        and parts[1] != m.files_under:
                    out.dead.append(self.bucket.where(rel))
        for rel in objects:  # conditional-write probes of writers killed before they removed them
            owner = _names.owner(rel[len(INDEX) + 1 :], PROBE) if rel.startswith(f"{INDEX}/") else None
            if owner is not None:
                state = _names.liveness(owner)
                if state == _names.DEAD:
                    out.dead.append(self.bucket.where(rel))
                elif state == _names.UNKNOWN:
                    out.undecided.append(self.bucket.where(rel))
        uploads = [(key, uid) for key, uid in self.bucket.uploads() if key.split("/")[0] not in busy]
        out.dead += [f"{self.bucket.where(key)} (unfinished upload)" for key, _uid in uploads]
        out.stale = [d.manifest.name for d in listing.damaged if d.manifest is not None
                     and d.manifest.layout == "file" and d.manifest.name not in objects
                     and d.manifest.name not in busy]
        return out, locks, uploads

    def orphans(self) -> Orphans:
        return self._scan()[0]

    def recover(self) -> Recovery:
        found, locks, uploads = self._scan()
        report = Recovery(undecided=found.undecided)
        for key, (doc, etag, state) in sorted(locks.items()):
            if state == _names.DEAD:
                self.settle(key, (doc, etag), report)
        for url in found.dead:
            if url.startswith(self.bucket.where(f"{INDEX}/{COMMITTING}")) or url.endswith("(unfinished upload)"):
                continue
            self.bucket.delete(url[len(self.bucket.where("")) + 1 :])  # the key below the prefix
            report.removed.append(url)
        for key, uid in uploads:
            self.bucket.abort(key, uid)
            report.removed.append(f"{self.bucket.where(key)} (unfinished upload)")
        for name in found.stale:
            self.bucket.delete(self.manifest_key(name, "file"))
            report.stale.append(name)
        return report

    def settle(self, key: str, held: tuple[dict[str, Any], str], report: Recovery | None = None
               ) -> None:
        """Finishes or undoes the commit of a dead writer that holds lock ``key``; then removes the lock."""
        doc, etag = held
        name, layout = str(doc.get("name", "")), str(doc.get("layout", ""))
        if _names.check_name(name) is None and layout in ("file", "dir"):
            if layout == "file":
                self._settle_file(name, doc.get("intent"), doc.get("replaces"), report)
            else:
                self._settle_dir(name)
            for upload_key, uid in self.bucket.uploads():
                if upload_key == name or upload_key.startswith(f"{name}/"):
                    self.bucket.abort(upload_key, uid)
        try:
            self.bucket.delete(key, match=etag)
        except PreconditionFailed:
            return  # settled by another gc meanwhile
        if report is not None:
            report.removed.append(self.bucket.where(key))

    def _settle_file(self, name: str, intent_doc: Any, replaces: Any, report: Recovery | None) -> None:
        intent = None
        if isinstance(intent_doc, dict):
            try:
                intent = Manifest.from_json(_json(intent_doc), source=self.where(name))
            except CorruptCheckpointError:
                intent = None
        committed = self._committed(name, "file")
        matches = False
        if intent is not None and len(intent.files) == 1:
            f = intent.files[0]
            head = self.bucket.head(name)
            matches = head is not None and head[1] != replaces and head[0] == f.size and \
                self.bucket.digest(name, f.algorithm) == (f.size, f.digest)
        if matches and (committed is None or committed[0] != intent):
            assert intent is not None
            self.bucket.put(self.manifest_key(name, "file"), intent.to_json())
            if report is not None:
                report.rolled_forward.append(name)
            return
        if report is not None and intent is not None:
            report.rolled_back.append(name)
        if committed is None and self.bucket.head(name) is not None:
            self.bucket.delete(name)  # uploaded by the dead writer, never committed

    def settle_leftovers(self, name: str) -> None:
        """Removes what no manifest of folder checkpoint ``name`` references, and aborts its uploads."""
        self._settle_dir(name)
        for upload_key, uid in self.bucket.uploads():
            if upload_key.startswith(f"{name}/"):
                self.bucket.abort(upload_key, uid)

    def _settle_dir(self, name: str) -> None:
        committed = self._committed(name, "dir")
        keep = set()
        if committed is not None:
            m = committed[0]
            keep = {self.data_key(name, "dir", m.files_under, f.path) for f in m.files} | {f"{name}/{MANIFEST}"}
        for rel in self.bucket.listing(f"{name}/"):
            if rel not in keep:
                self.bucket.delete(rel)


def _json(doc: dict[str, Any]) -> bytes:
    import json

    return json.dumps(doc).encode("utf-8")
