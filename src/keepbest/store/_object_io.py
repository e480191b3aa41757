"""Requests of the object-store backend: one bucket prefix through fsspec, with conditional writes.

Everything the backend sends goes through :class:`Bucket`: conditional PUT
(``If-None-Match: *`` to create, ``If-Match: <etag>`` to compare-and-swap),
GET with the ETag, DELETE (conditional too), one recursive LIST, ranged
GETs, and multipart uploads streamed part by part with the BLAKE3 digest
computed on the way (memory: a few parts). The S3 calls go to s3fs's client
(``S3FileSystem.call_s3``), so credentials, ``AWS_ENDPOINT_URL`` and
``storage_options`` work as they do for s3fs itself.

A store without conditional writes cannot keep two writers from taking
the same version number or overwriting each other's commit; :class:`Bucket`
checks once, at the first write, that the server refuses a conditional
PUT it must refuse, and raises otherwise (see the README).
"""

from __future__ import annotations

import builtins
import errno
import io
import itertools
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO, Iterable, Iterator

import fsspec.asyn

from keepbest import _digest
from keepbest.store import _names
from keepbest.store.base import BufferFile
from keepbest.errors import StorageError

PART = 8 << 20  # bytes per uploaded part (S3's minimum is 5 MiB, except for the last part)
PARALLEL_PARTS = 4  # parts in flight at once: memory is about PART * (PARALLEL_PARTS + 1) and the HTTP buffers
READ_CHUNK = 8 << 20
ACTIVE: set[tuple[str, str]] = set()  # (store url, commit lock key) held by a save of this process
ACTIVE_LOCK = threading.Lock()
_CHECKED: set[tuple[object, str]] = set()  # (endpoint, bucket) seen to honour If-None-Match


class PreconditionFailed(Exception):
    """The server refused a conditional request: the object exists, or changed since it was read."""


class Bucket:
    """Objects under ``bucket/prefix`` of the s3fs filesystem ``fs``; keys are relative to the prefix."""

    def __init__(self, fs: Any, url: str, bucket: str, prefix: str) -> None:
        self.fs, self.url, self.bucket, self.prefix = fs, url, bucket, prefix.strip("/")
        self._checked = False
        self._lock = threading.Lock()

    # -- names ------------------------------------------------------------------------------
    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def where(self, rel: str = "") -> str:
        return f"{self.url}/{rel}" if rel else self.url

    def _rel(self, key: str) -> str:
        return key[len(self.prefix) + 1 :] if self.prefix else key

    # -- calls ------------------------------------------------------------------------------
    def call(self, method: str, rel: str | None, what: str, **kw: Any) -> Any:
        """One S3 request; a refused condition raises :class:`PreconditionFailed`, a missing key
        FileNotFoundError, anything else :class:`StorageError` naming the URL and the fix.

        The body of a GET is read here (on s3fs's event loop): ``out["Body"]`` is bytes.
        """
        if rel is not None:
            kw["Key"] = self.key(rel)
        try:
            return fsspec.asyn.sync(self.fs.loop, self._request, method, Bucket=self.bucket, **kw)
        except FileExistsError as e:  # s3fs's reading of 412 on If-None-Match
            raise PreconditionFailed(str(e)) from None
        except FileNotFoundError as e:
            if "bucket does not exist" in str(e) or "NoSuchBucket" in str(e):
                raise self.failure(what, rel, e) from None
            raise
        except OSError as e:
            text = str(e)
            if "pre-condition" in text or "PreconditionFailed" in text or "ConditionalRequestConflict" in text:
                raise PreconditionFailed(text) from None
            if e.errno == errno.ENOENT:
                raise FileNotFoundError(text) from None
            raise self.failure(what, rel, e) from e
        except Exception as e:  # credentials, endpoint, network: botocore's own classes
            raise self.failure(what, rel, e) from e

    async def _request(self, method: str, **kw: Any) -> Any:
        out = await self.fs._call_s3(method, **kw)
        if method == "get_object":
            body = out["Body"]
            try:
                out["Body"] = await body.read()
            finally:
                body.close()
        return out

    def failure(self, what: str, rel: str | None, e: BaseException) -> StorageError:
        return StorageError(
            getattr(e, "errno", None) or errno.EIO,
            f"Cannot {what} {self.where(rel or '')}: {type(e).__name__}: {e}. Check that the bucket "
            f"'{self.bucket}' exists and that the credentials allow it (AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, or storage_options=...). Nothing was committed by this "
            f"call. Received: {self.where(rel or '')}", self.where(rel or ""))

    # -- small objects ----------------------------------------------------------------------------
    def put(self, rel: str, data: bytes, *, create: bool = False, match: str | None = None) -> str:
        """PUTs ``data``; ``create``: only if absent; ``match``: only if its ETag is still ``match``."""
        self._check_conditions()
        kw: dict[str, Any] = {"Body": data}
        if create:
            kw["IfNoneMatch"] = "*"
        if match is not None:
            kw["IfMatch"] = match
        return str(self.call("put_object", rel, "write", **kw)["ETag"])

    def get(self, rel: str) -> tuple[bytes, str] | None:
        """The object's bytes and ETag, or None when absent."""
        try:
            out = self.call("get_object", rel, "read")
        except FileNotFoundError:
            return None
        return bytes(out["Body"]), str(out["ETag"])

    def head(self, rel: str) -> tuple[int, str] | None:
        try:
            out = self.call("head_object", rel, "look at")
        except FileNotFoundError:
            return None
        return int(out["ContentLength"]), str(out["ETag"])

    def delete(self, rel: str, *, match: str | None = None) -> None:
        """Removes ``rel`` (nothing if absent); ``match``: only if its ETag is still ``match``."""
        kw = {"IfMatch": match} if match is not None else {}
        try:
            self.call("delete_object", rel, "delete", **kw)
        except FileNotFoundError:
            if match is not None:
                raise PreconditionFailed(f"{self.where(rel)} is gone") from None

    def listing(self, under: str = "") -> dict[str, tuple[int, str]]:
        """Every object below the prefix (or below ``under`` in it): key -> (size, ETag)."""
        out: dict[str, tuple[int, str]] = {}
        token: str | None = None
        start = self.key(under) if under else (self.prefix + "/" if self.prefix else "")
        while True:
            kw: dict[str, Any] = {"Prefix": start}
            if token:
                kw["ContinuationToken"] = token
            page = self.call("list_objects_v2", None, "list", **kw)
            for item in page.get("Contents", []):
                out[self._rel(item["Key"])] = (int(item["Size"]), str(item["ETag"]))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return out

    def read_range(self, rel: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        out = self.call("get_object", rel, "read", Range=f"bytes={offset}-{offset + length - 1}")
        return bytes(out["Body"])

    def stream(self, rel: str) -> Iterator[bytes]:
        """The object's bytes in order, in chunks of :data:`READ_CHUNK`: ranged GETs, a few in flight.

        Every range is read with ``If-Match`` on the ETag seen first, so an object replaced while it is
        read raises FileNotFoundError instead of yielding a mix of two objects.
        """
        head = self.head(rel)
        if head is None:
            raise FileNotFoundError(self.where(rel))
        size, etag = head
        offsets = iter(range(0, size, READ_CHUNK))
        with ThreadPoolExecutor(PARALLEL_PARTS, thread_name_prefix="keepbest-download") as pool:
            window = deque(pool.submit(self._range, rel, off, min(READ_CHUNK, size - off), etag)
                           for off in itertools.islice(offsets, PARALLEL_PARTS))
            while window:
                chunk = window.popleft().result()
                off = next(offsets, None)
                if off is not None:
                    window.append(pool.submit(self._range, rel, off, min(READ_CHUNK, size - off), etag))
                yield chunk

    def _range(self, rel: str, offset: int, length: int, etag: str) -> bytes:
        try:
            out = self.call("get_object", rel, "read", Range=f"bytes={offset}-{offset + length - 1}", IfMatch=etag)
        except PreconditionFailed:
            raise FileNotFoundError(f"{self.where(rel)} was replaced while it was read") from None
        return bytes(out["Body"])

    # -- uploads --------------------------------------------------------------------------------
    def upload(self, rel: str, pieces: Iterable[memoryview | bytes], *, before_visible: Any = None,
               algorithm: str = _digest.DEFAULT, digest: str | None = None) -> tuple[int, str]:
        """Uploads the concatenation of ``pieces`` to ``rel``; returns (size, digest).

        Streamed as multipart (parts of :data:`PART`, a few in flight), hashed
        on the way. ``before_visible(size, digest)`` runs once every byte is
        uploaded and before the object appears (the multipart completion),
        so the caller can record an intent first. A failure aborts the upload.
        A ``digest`` the caller already computed from the same bytes is not computed again.
        """
        self._check_conditions()
        h = _digest.new(algorithm, threads=True) if digest is None else None
        size, mpu = 0, None
        # PARALLEL_PARTS + 1 part buffers, reused: one is filled while the others are sent. A buffer is
        # refilled only once its part is sent, so memory stays at these buffers whatever the size.
        buffers: list[bytearray] = [bytearray(PART)]
        sending: dict[int, Future[dict[str, Any]]] = {}  # buffer index -> its part's upload
        current, filled = 0, 0
        pool: ThreadPoolExecutor | None = None
        futures: list[Future[dict[str, Any]]] = []

        def send() -> None:
            nonlocal mpu, pool, current
            if mpu is None:
                mpu = self.call("create_multipart_upload", rel, "upload")["UploadId"]
                pool = ThreadPoolExecutor(PARALLEL_PARTS, thread_name_prefix="keepbest-upload")
                buffers.extend(bytearray(PART) for _ in range(PARALLEL_PARTS))
            assert pool is not None
            future = pool.submit(self._part, rel, mpu, len(futures) + 1, memoryview(buffers[current])[:filled])
            futures.append(future)
            sending[current] = future
            free = [i for i in range(len(buffers)) if i not in sending]
            if free:
                current = free[0]
            else:  # reuse the buffer of the oldest part once it is sent (its failure is raised here, early)
                current = min(sending, key=lambda i: futures.index(sending[i]))
                sending.pop(current).result()

        try:
            for piece in pieces:
                view = memoryview(piece).cast("B")
                if h is not None:
                    h.update(view)
                size += view.nbytes
                while view.nbytes:
                    take = min(PART - filled, view.nbytes)
                    buffers[current][filled : filled + take] = view[:take]
                    filled += take
                    view = view[take:]
                    if filled == PART:
                        send()
                        filled = 0
            digest = str(h.hexdigest()) if h is not None else str(digest)
            if mpu is None:  # small: one PUT
                if before_visible is not None:
                    before_visible(size, digest)
                self.call("put_object", rel, "upload", Body=bytes(buffers[current][:filled]))
                return size, digest
            if filled:
                send()
            parts = [f.result() for f in futures]
            if before_visible is not None:
                before_visible(size, digest)
            self.call("complete_multipart_upload", rel, "upload", UploadId=mpu,
                      MultipartUpload={"Parts": parts})
            mpu = None
            return size, digest
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            if mpu is not None:
                self.abort(rel, mpu)

    def _part(self, rel: str, mpu: str, number: int, data: memoryview) -> dict[str, Any]:
        # A file-like body is streamed by aiohttp; a bytes body would be copied once more (BytesIO.getbuffer).
        body = io.BufferedReader(BufferFile(data))
        out = self.call("upload_part", rel, "upload", UploadId=mpu, PartNumber=number, Body=body)
        return {"PartNumber": number, "ETag": out["ETag"]}

    def abort(self, rel: str, upload_id: str) -> None:
        try:
            self.call("abort_multipart_upload", rel, "abort an upload to", UploadId=upload_id)
        except FileNotFoundError:
            pass

    def uploads(self) -> builtins.list[tuple[str, str]]:
        """Multipart uploads in progress (or abandoned) under the prefix: (key, upload id)."""
        out: list[tuple[str, str]] = []
        kw: dict[str, Any] = {"Prefix": self.prefix + "/" if self.prefix else ""}
        while True:
            page = self.call("list_multipart_uploads", None, "list uploads in", **kw)
            out += [(self._rel(u["Key"]), u["UploadId"]) for u in page.get("Uploads", [])]
            if not page.get("IsTruncated"):
                return out
            kw.update(KeyMarker=page.get("NextKeyMarker"), UploadIdMarker=page.get("NextUploadIdMarker"))

    def download(self, rel: str, dest: BinaryIO | None, algorithm: str = _digest.DEFAULT) -> tuple[int, str]:
        """Writes the object into ``dest`` (None: only hashes it); returns (size, digest) computed on the way."""
        h = _digest.new(algorithm, threads=True)
        size = 0
        for chunk in self.stream(rel):
            h.update(chunk)
            if dest is not None:
                dest.write(chunk)
            size += len(chunk)
        return size, str(h.hexdigest())

    def digest(self, rel: str, algorithm: str = _digest.DEFAULT) -> tuple[int, str]:
        return self.download(rel, None, algorithm)

    # -- the one check ----------------------------------------------------------------------------
    def _check_conditions(self) -> None:
        """Refuses a store that ignores ``If-None-Match`` (once per process and bucket)."""
        endpoint = getattr(getattr(self.fs, "s3", None), "meta", None)
        seen = (getattr(endpoint, "endpoint_url", None), self.bucket)
        if self._checked or seen in _CHECKED:
            return
        with self._lock:
            if self._checked or seen in _CHECKED:
                return
            probe = f"{_names.INDEX}/{_names.temp(_names.PROBE)}"  # its owner's token: gc removes a dead one's
            self.call("put_object", probe, "write", Body=b"probe")
            try:
                self.call("put_object", probe, "write", Body=b"probe", IfNoneMatch="*")
            except PreconditionFailed:
                self._checked = True
                _CHECKED.add(seen)
                return
            finally:
                self.delete(probe)
            raise StorageError(
                errno.ENOTSUP,
                f"Cannot use {self.url}: the server ignores conditional writes (a PUT with 'If-None-Match: *' "
                "over an existing object succeeded). keepbest commits a checkpoint and updates versions and "
                "aliases with conditional writes; without them two writers could overwrite each other's "
                "commits. Use a store that supports them (AWS S3 since 2024, MinIO, recent Ceph RGW), or save to "
                f"a local folder. Received: {self.url}", self.url)
