"""Where checkpoints live: the storage contract and its backends. The only code that touches files.

``keepbest.store.open(location)`` returns the store of a folder: a plain or
``~`` path, or a ``file://`` URL, is a :class:`~keepbest.store.local.LocalStore`.
A URL whose scheme has no backend here (``s3://``, ``gs://``, ``ftp://`` ...) is
an error at once, naming what to install, so nothing is ever written into a
local folder named after the scheme.

Example:
    >>> import tempfile
    >>> open(tempfile.mkdtemp()).list().manifests
    []
    >>> open("s3://bucket/run")
    Traceback (most recent call last):
    ...
    keepbest.errors.StorageError: ... Install it: pip install 'keepbest[s3]' ...
"""

from __future__ import annotations

import importlib
import os
import re
import urllib.parse

from keepbest.errors import StorageError
from keepbest.store import _names
from keepbest.store._names import liveness, owner_token
from keepbest.store.base import (
    ANY, Damaged, Listing, Orphans, Reader, Record, RecordConflictError, Recovery, Staged, Store, Watch,
)
from keepbest.store.local import LocalStore

__all__ = ["ANY", "Damaged", "Listing", "LocalStore", "Orphans", "Reader", "Record", "RecordConflictError",
           "Recovery", "Staged", "Store", "Watch", "absolute", "is_url", "liveness", "locate", "open", "owner_token"]

INDEX = _names.INDEX
MANIFEST = _names.MANIFEST

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# scheme -> (module of keepbest's backend, the library it needs, the extra that installs it)
_OBJECT_STORES = {
    "s3": ("keepbest.store.object", "s3fs", "s3"),
    "gs": ("keepbest.store.object", "gcsfs", "gcs"),
    "gcs": ("keepbest.store.object", "gcsfs", "gcs"),
}


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(location, str) and _SCHEME.match(location) is not None


def open(location: str | os.PathLike[str]) -> Store:  # noqa: A001 - the verb is the point
    """The store at ``location``: a local path, ``~/...``, ``file:///...``, or an object-store URL.

    Raises :class:`~keepbest.errors.StorageError` (an ``OSError``) when no
    backend serves the URL's scheme, and ValueError for an empty location.
    """
    text = os.fsdecode(os.fspath(location))
    if not text:
        raise ValueError("The checkpoint location is empty. Pass a folder or a file path (or a URL). "
                         "Received: ''")
    match = _SCHEME.match(text)
    if match is None:
        return LocalStore(text)
    scheme = match.group(1).lower()
    if scheme == "file":
        parsed = urllib.parse.urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"Cannot use {text}: a file:// URL names a path on this machine, not on host "
                               f"'{parsed.netloc}'. Use file:///absolute/path. Received: {text}")
        return LocalStore(urllib.parse.unquote(parsed.path) or "/")
    if scheme in _OBJECT_STORES:
        module, library, extra = _OBJECT_STORES[scheme]
        try:
            backend = importlib.import_module(module)
        except ImportError as e:
            raise StorageError(
                f"Cannot use {text}: no storage backend for {scheme}:// is installed ({e}). Object stores need "
                f"keepbest's object-store backend and {library}. Install it: pip install 'keepbest[{extra}]' "
                "(this version of keepbest does not ship that backend yet; until it does, save to a local "
                "folder or a mounted bucket path). Nothing was written. "
                f"Received: {text}") from None
        return backend.open(text)  # type: ignore[no-any-return]
    known = ", ".join(f"{s}://" for s in _OBJECT_STORES)
    raise StorageError(
        f"Cannot use {text}: keepbest cannot store checkpoints at {scheme}:// URLs. Pass a local path, a "
        f"file:// URL or an object-store URL ({known}). Nothing was written. Received: {text}")


def locate(location: str | os.PathLike[str]) -> tuple[Store, str | None]:
    """The store that holds ``location`` and the checkpoint it names.

    ``location`` may be one checkpoint (a Keras file, a checkpoint folder):
    then ``(its folder's store, its name)``; else a folder of checkpoints:
    ``(its store, None)``.
    """
    store = open(location)
    if store.entry_kind() is None:
        return store, None
    return store.parent(), store.basename


def absolute(location: str | os.PathLike[str]) -> str:
    """``location`` as it will still mean after an ``os.chdir``: an absolute path, or the URL."""
    return open(location).url
