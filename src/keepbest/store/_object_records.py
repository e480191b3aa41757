"""Records of the object-store backend (``.keepbest/<key>.json``, compared by ETag) and its polling watch."""

from __future__ import annotations

import builtins
import os
import threading
import time

from keepbest.store import _names
from keepbest.store._names import INDEX, RESERVED
from keepbest.store._object_io import Bucket, PreconditionFailed
from keepbest.store.base import ANY, Record, RecordConflictError, Watch


class ObjectRecords:
    """The record half of :class:`keepbest.store.object.ObjectStore`: compare-and-swap with ``If-Match``."""

    bucket: Bucket
    url: str

    def record_key(self, *parts: str) -> str:
        return "/".join(_names.component(p) for p in parts)

    def _record_rel(self, key: str) -> str:
        return f"{INDEX}/{key}.json"

    def read_record(self, key: str) -> Record | None:
        got = self.bucket.get(self._record_rel(key))
        return None if got is None else Record(key, got[0], got[1])

    def _conflict(self, key: str, expect: str | None) -> RecordConflictError:
        return RecordConflictError(
            f"Record {key} in {self.url} changed since it was read (another writer updated it). Read it again "
            f"and retry. Received: expected={expect}")

    def write_record(self, key: str, data: bytes, *, expect: str | None = ANY) -> str:
        rel = self._record_rel(key)
        try:
            if expect == ANY:
                return self.bucket.put(rel, data)
            if expect is None:
                return self.bucket.put(rel, data, create=True)
            return self.bucket.put(rel, data, match=expect)
        except PreconditionFailed:
            raise self._conflict(key, expect) from None

    def delete_record(self, key: str, *, expect: str | None = ANY) -> None:
        rel = self._record_rel(key)
        if expect is None:
            if self.bucket.head(rel) is not None:
                raise self._conflict(key, expect)
            return
        try:
            self.bucket.delete(rel, match=None if expect == ANY else expect)
        except PreconditionFailed:
            raise self._conflict(key, expect) from None

    def list_records(self, prefix: str) -> builtins.list[str]:
        out = []
        for rel in self.bucket.listing(f"{INDEX}/{prefix}/"):
            leaf = rel.rsplit("/", 1)[-1]
            if leaf.endswith(".json") and not leaf.startswith(RESERVED):
                out.append(rel[len(INDEX) + 1 : -len(".json")])
        return sorted(out)

    def set_aside(self, key: str) -> str | None:
        got = self.bucket.get(self._record_rel(key))
        if got is None:
            return None
        aside = f"damaged/{key}-{time.strftime('%Y%m%dT%H%M%S')}-{os.urandom(2).hex()}"
        self.bucket.put(self._record_rel(aside), got[0], create=True)
        try:
            self.bucket.delete(self._record_rel(key), match=got[1])
        except PreconditionFailed:
            pass  # rewritten meanwhile: the new record stays, the damaged copy is kept aside
        return aside

    def record_where(self, key: str) -> str:
        return self.bucket.where(self._record_rel(key))


class PollWatch(Watch):
    """Returns once a LIST of the prefix differs from the previous one (a poll every ``poll_interval``)."""

    def __init__(self, bucket: Bucket, poll_interval: float) -> None:
        self.bucket, self.poll_interval = bucket, max(0.05, poll_interval)
        self._seen = bucket.listing()
        self._closed = threading.Event()

    def wait(self, timeout: float) -> bool:
        """True once the listing changed; False at the timeout (a LIST of the whole prefix saw no change)."""
        deadline = time.monotonic() + timeout
        while not self._closed.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._closed.wait(min(self.poll_interval, left))
            now = self.bucket.listing()
            if now != self._seen:
                self._seen = now
                return True
        return True

    def close(self) -> None:
        self._closed.set()
