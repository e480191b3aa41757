"""Where checkpoints live: the storage contract and its backends. The only code that touches files.

``keepbest.store.open(location)`` returns the store of a folder: a plain or
``~`` path, or a ``file://`` URL, is a :class:`~keepbest.store.local.LocalStore`;
``s3://bucket/prefix`` an :class:`~keepbest.store.object.ObjectStore` (with
``keepbest[s3]`` installed, else an error naming what to install). A URL whose
scheme has no backend here (``gs://``, ``ftp://`` ...) is an error at once, so
nothing is ever written into a local folder named after the scheme.

Example:
    >>> import tempfile
    >>> open(tempfile.mkdtemp()).list().manifests
    []
    >>> open("ftp://host/run")
    Traceback (most recent call last):
    ...
    keepbest.errors.StorageError: Cannot use ftp://host/run: keepbest cannot store checkpoints at ftp:// URLs...
"""

from __future__ import annotations

import os
import re
import urllib.parse
from pathlib import Path
from typing import Any, Mapping

from keepbest.errors import StorageError
from keepbest.store import _fs, _names
from keepbest.store._names import liveness, owner_token
from keepbest.store.base import (
    ANY, Damaged, Listing, Orphans, Reader, Record, RecordConflictError, Recovery, Staged, Store, Watch,
)
from keepbest.store.local import LocalStore

__all__ = ["ANY", "Damaged", "Listing", "LocalStore", "Orphans", "Reader", "Record", "RecordConflictError",
           "Recovery", "Staged", "Store", "Watch", "absolute", "is_url", "liveness", "locate", "open", "owner_token",
           "write_file"]

INDEX = _names.INDEX
MANIFEST = _names.MANIFEST

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(location, str) and _SCHEME.match(location) is not None


def open(location: "str | os.PathLike[str] | Store",  # noqa: A001 - the verb is the point
         storage_options: Mapping[str, Any] | None = None) -> Store:
    """The store at ``location``: a local path, ``~/...``, ``file:///...``, or ``s3://bucket/prefix``.

    ``storage_options`` go to s3fs (endpoint, credentials, ...); without them
    s3fs reads the AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...).
    Raises :class:`~keepbest.errors.StorageError` (an ``OSError``) when no
    backend serves the URL's scheme, and ValueError for an empty location.
    """
    if isinstance(location, Store):
        return location
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
    if scheme == "s3":
        try:
            import s3fs  # noqa: F401 - only to say what is missing before anything is written
            from keepbest.store import object as backend
        except ImportError as e:
            raise StorageError(
                f"Cannot use {text}: the object-store backend needs s3fs ({e}). Install it: pip install "
                f"'keepbest[s3]'. Nothing was written. Received: {text}") from None
        return backend.open(text, storage_options)
    if scheme in ("gs", "gcs"):
        raise StorageError(
            f"Cannot use {text}: keepbest's object-store backend serves s3:// only in this version. Its commit "
            "needs conditional writes (generation preconditions) that no GCS emulator installable here honours, so "
            "gs:// is untested and not offered. Use GCS's S3-compatible endpoint (s3:// with AWS_ENDPOINT_URL=https://storage.googleapis.com "
            f"and HMAC keys) or a mounted bucket path. Nothing was written. Received: {text}")
    known = "s3://"
    raise StorageError(
        f"Cannot use {text}: keepbest cannot store checkpoints at {scheme}:// URLs. Pass a local path, a "
        f"file:// URL or an object-store URL ({known}). Nothing was written. Received: {text}")


def locate(location: "str | os.PathLike[str] | Store",
           storage_options: Mapping[str, Any] | None = None) -> tuple[Store, str | None]:
    """The store that holds ``location`` and the checkpoint it names.

    ``location`` may be one checkpoint (a Keras file, a checkpoint folder):
    then ``(its folder's store, its name)``; else a folder of checkpoints:
    ``(its store, None)``.
    """
    store = open(location, storage_options)
    if store.entry_kind() is None:
        return store, None
    return store.parent(), store.basename


def absolute(location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> str:
    """``location`` as it will still mean after an ``os.chdir``: an absolute path, or the URL."""
    return open(location, storage_options).url


def write_file(path: str | os.PathLike[str], data: bytes) -> str:
    """Writes ``data`` to the local file ``path`` atomically (a report, an export); returns its absolute path.

    Raises :class:`~keepbest.errors.StorageError` for a URL (write locally, then copy it) and
    FileNotFoundError when the folder does not exist.
    """
    text = os.fsdecode(os.fspath(path))
    if is_url(text) or not text:
        raise StorageError(f"Cannot write {text or 'an empty path'}: only a local file path is supported here. "
                           f"Write it locally, then copy it. Received: {text!r}")
    target = os.path.abspath(os.path.expanduser(text))
    _fs.write_durably(Path(target), data)
    return target
