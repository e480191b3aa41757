"""What a save costs, recorded in its manifest: the caller's stall, the persist time, the bytes reused.

Example:
    >>> import tempfile
    >>> from keepbest import store
    >>> staged = CountingStaged(store.open(tempfile.mkdtemp()).stage("c1", "dir"))
    >>> _ = staged.write("a.bin", b"1234")
    >>> staged.reused_bytes
    0
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from keepbest.manifest import FileEntry, Manifest
from keepbest.store import Staged


class CountingStaged(Staged):
    """A staged checkpoint that counts the bytes its payload reused from the previous checkpoint (dedup)
    instead of writing them; everything else goes to the wrapped one, which is what gets committed."""

    def __init__(self, inner: Staged) -> None:
        self.inner = inner
        self.name, self.layout = inner.name, inner.layout
        self.reused_bytes = 0

    def local_path(self) -> Path:
        return self.inner.local_path()

    def write(self, rel: str, data: bytes | Sequence[memoryview], digest: str | None = None) -> FileEntry:
        return self.inner.write(rel, data, digest)

    def link(self, rel: str, base: Manifest, entry: FileEntry) -> bool:
        linked = self.inner.link(rel, base, entry)
        if linked:
            self.reused_bytes += entry.size
        return linked

    def free_bytes(self) -> int | None:
        return self.inner.free_bytes()

    def handle(self) -> dict[str, Any]:
        return self.inner.handle()

    def __getattr__(self, name: str) -> Any:  # a backend's own attributes (its path, ...)
        return getattr(self.inner, name)
