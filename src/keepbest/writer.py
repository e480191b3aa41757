"""Background persistence: one writer thread, one save in flight, errors that surface.

The caller snapshots what it saves into host memory (into reusable
:class:`Staging` buffers), then hands the slow part (writing, fsync, commit,
retention) to :meth:`AsyncWriter.submit`. At most one save is in flight: the
next one first waits for the previous one (back-pressure, so memory stays
bounded and checkpoints commit in order). A failure in the background is
never swallowed: :meth:`SaveHandle.result` raises it as it was, and if
nobody asked for it, the next ``submit``, ``check``, ``wait`` or ``close``
raises :class:`~keepbest.errors.AsyncSaveError` naming the save and the cause.

Example:
    >>> writer = AsyncWriter()
    >>> handle = writer.submit("demo", lambda: 41 + 1)
    >>> handle.result()
    42
    >>> failing = writer.submit("ckpt-7", lambda: 1 / 0)
    >>> writer.wait()
    Traceback (most recent call last):
    ...
    keepbest.errors.AsyncSaveError: Background save of ckpt-7 failed: ZeroDivisionError: division by zero. ...
    >>> writer.close()
"""

from __future__ import annotations

import atexit
import mmap
import os
import sys
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Generic, Mapping, TypeVar

import numpy as np

from keepbest import _digest
from keepbest.errors import AsyncSaveError

T = TypeVar("T")


class SaveHandle(Generic[T]):
    """A save handed to the background writer.

    ``result()`` waits for it and returns its value, or raises its error as it
    was raised (which counts as reported: the writer will not raise it again).
    """

    def __init__(self, description: str, future: Future[T]) -> None:
        self.description = description
        self._future = future
        self.reported = False

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> T:
        try:
            return self._future.result(timeout)
        except BaseException:
            if self._future.done():
                self.reported = True
            raise

    def error(self) -> BaseException | None:
        """The failure of a finished save, else None (never blocks)."""
        if not self._future.done() or self._future.cancelled():
            return None
        return self._future.exception()

    def __repr__(self) -> str:
        state = "running" if not self.done() else ("failed" if self.error() else "committed")
        return f"SaveHandle({self.description!r}, {state})"


class AsyncWriter:
    """Runs saves on one background thread, at most one at a time.

    Use one writer from one training loop. ``close()`` waits for the save in
    flight, stops the thread and frees the staging buffers; a closed writer
    starts again on the next ``submit``.
    """

    def __init__(self) -> None:
        self.staging = Staging(busy=lambda: self.in_flight is not None)
        self._executor: ThreadPoolExecutor | None = None
        self._last: SaveHandle[Any] | None = None
        self._lock = threading.Lock()
        _live_writers.add(self)

    @property
    def in_flight(self) -> SaveHandle[Any] | None:
        """The save that has not finished yet, if any."""
        last = self._last
        return last if last is not None and not last.done() else None

    def submit(self, description: str, job: Callable[[], T]) -> SaveHandle[T]:
        """Runs ``job`` in the background once the previous save has finished.

        Raises the previous save's unreported failure instead of starting this one.
        """
        with self._lock:
            self.wait()
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keepbest-writer",
                                                    initializer=_yield_to_training)
            handle: SaveHandle[T] = SaveHandle(description, self._executor.submit(job))
            self._last = handle
            return handle

    def check(self) -> None:
        """Raises the failure of a finished background save not yet reported; never blocks."""
        last = self._last
        if last is None or last.reported:
            return
        error = last.error()
        if error is not None:
            last.reported = True
            raise AsyncSaveError(
                f"Background save of {last.description} failed: {type(error).__name__}: {error}. "
                "The checkpoints committed before it are intact. Fix the cause and save again. "
                f"Received: {error!r}"
            ) from error

    def wait(self) -> None:
        """Blocks until no save is in flight; raises an unreported background failure."""
        last = self._last
        if last is not None:
            last._future.exception()  # waits without raising; check() decides
        self.check()

    def close(self) -> None:
        """Waits for the save in flight, stops the thread and frees the staging buffers."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self.staging.release()

    def __enter__(self) -> "AsyncWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


WRITER_NICENESS = int(os.environ.get("KEEPBEST_WRITER_NICENESS", "5"))
"""How much lower than training the writer thread runs (Linux ``nice``; the environment variable
``KEEPBEST_WRITER_NICENESS`` sets it, 0 to run level with training). Where both want the CPU (training
on the CPU, or a busy input pipeline), training gets about three quarters of a contended core and the
writer the rest: the steps taken while a save is written slow down less, and the save still becomes
durable (at 10, training would get nine tenths, and on a busy CPU a save took several times longer to
become durable). An idle CPU is the writer's in full either way."""


def _yield_to_training() -> None:
    """Lowers the calling thread's CPU priority (Linux: a thread id names one thread; threads it starts
    inherit it; elsewhere the priority stays) and keeps its hashing on that thread, since BLAKE3's shared
    pool of threads would run at whatever priority it was started with."""
    _digest.one_thread_here()
    if sys.platform.startswith("linux"):
        try:
            me = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, me, min(19, os.getpriority(os.PRIO_PROCESS, me) + WRITER_NICENESS))
        except OSError as e:  # a sandbox may forbid it: the writer then runs as before
            declined["writer priority"] = repr(e)


class Staging:
    """Host buffers that snapshots are copied into, reused from one save to the next.

    Safe because a writer has one save in flight and the next snapshot is
    taken only after it finished (``busy`` tells; a snapshot while busy is
    refused). Costs one host copy of the saved state while allocated;
    :meth:`release` frees it.
    """

    def __init__(self, busy: Callable[[], bool] | None = None) -> None:
        self._buffers: dict[str, np.ndarray] = {}
        self._busy = busy or (lambda: False)
        self.allocations = 0
        """Buffers allocated so far: after the first snapshot of a given state, later ones allocate none."""

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._buffers.values())

    def snapshot(self, sources: Mapping[str, Mapping[str, Any]],
                 spec: Callable[[Any], tuple[tuple[int, ...], np.dtype[Any]]] | None = None,
                 copy: Callable[[np.ndarray, Any], None] | None = None,
                 allocate: Callable[[tuple[int, ...], np.dtype[Any]], np.ndarray] | None = None,
                 ) -> dict[str, dict[str, np.ndarray]]:
        """Copies ``{file: {tensor: source}}`` into staging buffers; returns the copies.

        ``spec(source)`` gives a source's shape and dtype and ``copy(dst, source)``
        fills a buffer (a framework's fastest host copy); both default to NumPy.
        ``allocate(shape, dtype)`` makes a new buffer (pinned memory, say); :func:`host_buffer` by default.
        Buffers of tensors absent from this snapshot are freed.
        """
        if self._busy():
            raise RuntimeError(
                "Cannot take a snapshot while a save is in flight: it would overwrite the buffers that "
                "save is writing. Call writer.wait() first (CheckpointManager.save_async does). "
                "Received: a snapshot request during a background save"
            )
        spec = spec or _numpy_spec
        copy = copy or _numpy_copy
        out: dict[str, dict[str, np.ndarray]] = {}
        used = set()
        for fname, tensors in sources.items():
            out[fname] = {}
            for name, src in tensors.items():
                key = f"{fname}\0{name}"
                used.add(key)
                shape, dtype = spec(src)
                buf = self._buffers.get(key)
                if buf is None or buf.shape != tuple(shape) or buf.dtype != dtype:
                    buf = self._buffers[key] = (allocate or host_buffer)(tuple(shape), dtype)
                    self.allocations += 1
                copy(buf, src)
                out[fname][name] = buf
        for key in set(self._buffers) - used:
            del self._buffers[key]
        return out

    def reserve(self, specs: Mapping[str, Mapping[str, tuple[tuple[int, ...], np.dtype[Any]]]],
                allocate: Callable[[tuple[int, ...], np.dtype[Any]], np.ndarray] | None = None) -> None:
        """Allocates the buffers a snapshot of ``{file: {tensor: (shape, dtype)}}`` will fill, and faults
        their pages in, so that the first snapshot costs one copy too. Meant for the writer thread, before
        the first save (``AsyncWriter.submit``): the snapshot waits for it like for any save in flight."""
        for fname, tensors in specs.items():
            for name, (shape, dtype) in tensors.items():
                key = f"{fname}\0{name}"
                buf = self._buffers.get(key)
                if buf is not None and buf.shape == tuple(shape) and buf.dtype == dtype:
                    continue
                buf = (allocate or host_buffer)(tuple(shape), dtype)
                if buf.flags.c_contiguous:
                    buf.reshape(-1).view(np.uint8)[::4096] = 0  # one write per page faults it in
                self._buffers[key] = buf
                self.allocations += 1

    def release(self) -> None:
        self._buffers.clear()


declined: dict[str, str] = {}
"""Speed-ups the system refused (huge pages, the writer's lower priority), with the error: nothing is lost
without them, and this says why a run is slower."""

_HUGE = 2 << 20  # a transparent huge page on x86-64 Linux


def host_buffer(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    """An uninitialised array; from 2 MiB on, in memory advised to use huge pages where the system allows
    (Linux), so the first copy into it faults in 512 times fewer pages (measured: 2.4x faster per GiB)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if nbytes < _HUGE or advice is None:
        return np.empty(shape, dtype)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(advice)
    except OSError as e:  # huge pages switched off ("never"): ordinary pages, as np.empty gives
        declined["huge pages"] = repr(e)
    return np.frombuffer(region, dtype).reshape(shape)  # the array keeps the mapping alive


_CHUNK = 16 << 20  # bytes per copy job: small enough to spread one large tensor over every core
_PARALLEL_MIN = 8 << 20  # below this, threads cost more than they save
_pool: ThreadPoolExecutor | None = None


def copy_all(pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """``np.copyto(dst, src)`` for each pair of same-shaped arrays, on every core: C-contiguous ones in
    chunks (NumPy releases the GIL while it copies), any other in one piece."""
    chunks: list[tuple[np.ndarray, np.ndarray]] = []
    for dst, src in pairs:
        if not (dst.flags.c_contiguous and src.flags.c_contiguous) or dst.dtype != src.dtype:
            np.copyto(dst, src, casting="no")
            continue
        d, s = dst.reshape(-1).view(np.uint8), src.reshape(-1).view(np.uint8)
        chunks.extend((d[i:i + _CHUNK], s[i:i + _CHUNK]) for i in range(0, d.size, _CHUNK))
    workers = min(os.cpu_count() or 1, 8)
    if sum(c[0].size for c in chunks) < _PARALLEL_MIN or workers == 1:
        for d, s in chunks:
            np.copyto(d, s)
        return
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(workers, thread_name_prefix="keepbest-copy")
    list(_pool.map(lambda c: np.copyto(c[0], c[1]), chunks))


def _numpy_spec(src: Any) -> tuple[tuple[int, ...], np.dtype[Any]]:
    arr = np.asarray(src)
    return arr.shape, arr.dtype


def _numpy_copy(dst: np.ndarray, src: Any) -> None:
    np.copyto(dst, np.asarray(src), casting="no")


# A failure that nobody collected before the interpreter exits is printed, never lost silently.
# (Pending saves finish first: the writer thread is joined before atexit handlers run.)
_live_writers: "weakref.WeakSet[AsyncWriter]" = weakref.WeakSet()


@atexit.register
def _report_uncollected() -> None:
    for writer in list(_live_writers):
        try:
            writer.check()
        except AsyncSaveError as e:
            print(f"keepbest: {e}", file=sys.stderr, flush=True)
