"""Publishing checkpoints to remote trackers (W&B, MLflow), in the background.

The core decides; publishers only mirror. After each commit the manager
hands the queue three kinds of events, in this order: the new version was
committed (with its aliases), the aliases now point here, these versions
were deleted (by retention, or replaced under the same name). A publisher
never re-decides what is best or what to keep.

The queue runs them on its own thread, so uploads never block training or
the next save. Each event is tried ``attempts`` times with exponential
backoff; a failure is logged when it happens (logger ``keepbest``) and
raised as :class:`~keepbest.errors.PublishError` by :meth:`PublishQueue.close`,
which the Keras callbacks call at the end of ``fit``. The local checkpoint
is never touched by a failed upload. After a failed upload, that
publisher's remote deletions are skipped (and listed in the error): the
remote side never loses an old version while it lacks the new one.

Uploads read a snapshot of the committed files that the store makes at
commit time (hard links under ``.keepbest/uploads/`` on a local folder), so
a checkpoint replaced or pruned locally while its upload waits is still
uploaded whole; the queue releases it once every publisher had its turn.

Example:
    >>> import numpy as np, tempfile
    >>> from keepbest import CheckpointManager
    >>> class Recorder(Publisher):
    ...     def __init__(self): self.seen = []
    ...     def committed(self, version): self.seen.append((version.number, version.aliases))
    >>> rec = Recorder()
    >>> mgr = CheckpointManager(tempfile.mkdtemp(), publishers=[rec])
    >>> _ = mgr.save(1, {"w": np.zeros(2)}, epoch=1); mgr.close()
    >>> rec.seen
    [(0, ('latest', 'epoch_1'))]
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from keepbest import progress
from keepbest.errors import PublishError
from keepbest.manifest import Manifest

log = logging.getLogger("keepbest")


@dataclass(frozen=True)
class Version:
    """One committed checkpoint as a version of its series' artifact.

    ``path`` is a stable copy of the committed files (hard links), valid
    while :meth:`Publisher.committed` runs: the checkpoint folder, or the
    single file of a file checkpoint.
    """

    number: int
    series: str
    manifest: Manifest
    path: Path
    aliases: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.manifest.name


class Publisher:
    """Receives the core's events; override what the remote side needs. Methods run on the queue's thread."""

    def committed(self, version: Version) -> None:
        """A new version was committed locally: upload it with its aliases."""

    def aliases_moved(self, series: str, aliases: Mapping[str, int]) -> None:
        """The aliases of ``series`` now point at these versions (all of them, not a difference)."""

    def deleted(self, series: str, number: int, name: str) -> None:
        """Version ``number`` (checkpoint ``name``) is gone locally: delete it remotely."""

    def close(self) -> None:
        """Everything was published; flush and let go of remote handles."""


@dataclass(frozen=True)
class _Event:
    kind: str  # "committed" | "aliases" | "deleted"
    series: str
    version: Version | None = None
    aliases: Mapping[str, int] | None = None
    number: int = -1
    name: str = ""
    release: Callable[[], None] | None = None
    outcome: Callable[[str, bool], None] | None = None  # (publisher, uploaded): where the status is recorded


class PublishQueue:
    """Runs publishers' events on one background thread, in order, with retries.

    Args:
        publishers: who receives the events.
        attempts: tries per event before it is reported as failed.
        backoff: seconds before the first retry; doubled after each.
    """

    def __init__(self, publishers: Sequence[Publisher], *, attempts: int = 4, backoff: float = 1.0,
                 sleep: Callable[[float], Any] = time.sleep) -> None:
        if not publishers or not all(isinstance(p, Publisher) for p in publishers):
            raise TypeError("publishers must be a non-empty list of keepbest.publishing.Publisher objects "
                            f"(e.g. WandbPublisher(), MlflowPublisher()). Received: publishers={publishers!r}")
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ValueError(f"attempts must be an integer >= 1. Received: attempts={attempts!r}")
        self.publishers = list(publishers)
        self.attempts, self.backoff, self._sleep = attempts, float(backoff), sleep
        self._events: queue.Queue[_Event | None] = queue.Queue()
        self._failures: list[str] = []
        self._upload_failed: set[int] = set()  # indices of publishers whose last upload failed
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._bar: progress.Bar | None = None

    # -- called by the manager (writer thread) ------------------------------------------
    def put(self, events: Sequence[_Event]) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("This PublishQueue is closed; create a new one. Received: an event after close()")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="keepbest-publish", daemon=True)
                self._thread.start()
        for e in events:
            self._events.put(e)

    # -- called by the training thread -----------------------------------------------------
    def wait(self) -> None:
        """Blocks until every queued event was tried; raises what failed so far."""
        self._events.join()
        self._raise()

    def close(self) -> None:
        """Publishes what is queued, closes the publishers, then raises what failed (once)."""
        with self._lock:
            thread, self._closed = self._thread, True
            backlog = self._events.unfinished_tasks  # queued, and the one being published
            if thread is not None and backlog:  # training is over and waits for the uploads: say how many are left
                self._bar = progress.bar(f"publishing ({', '.join(type(p).__name__ for p in self.publishers)})", backlog,
                                         unit="events")
        if thread is not None:
            self._events.put(None)
            thread.join()
        if self._bar is not None:
            self._bar.close()
        for p in self.publishers:
            self._try(p, "close", p.close)
        self._raise()

    def _raise(self) -> None:
        with self._lock:
            failures, self._failures = self._failures, []
        if failures:
            raise PublishError(
                f"Publishing checkpoints failed ({len(failures)} event(s)); every local checkpoint is intact "
                f"and can be uploaded again. Check the connection and credentials of the tracker. "
                f"Received: {' | '.join(failures)}")

    # -- the queue's thread --------------------------------------------------------------
    def _run(self) -> None:
        while (event := self._events.get()) is not None:
            try:
                try:
                    self._handle(event)
                finally:
                    if event.release is not None:
                        event.release()  # the snapshot this upload read
            except Exception as err:  # the thread must outlive any event, or wait() would never return
                self._fail(f"{event.kind} event of {event.series}: {type(err).__name__}: {err}")
            finally:
                self._events.task_done()
                with self._lock:
                    if self._bar is not None:
                        self._bar.advance(1)
        self._events.task_done()  # the None that closed the queue

    def _handle(self, e: _Event) -> None:
        for i, p in enumerate(self.publishers):
            if e.kind == "committed":
                assert e.version is not None
                version = e.version
                uploaded = self._try(p, f"upload of {e.series} v{version.number} ({version.name})",
                                     lambda: p.committed(version))
                if uploaded:
                    self._upload_failed.discard(i)
                else:
                    self._upload_failed.add(i)
                if e.outcome is not None:
                    self._record(e.outcome, type(p).__name__, uploaded, f"{e.series} v{version.number}")
            elif e.kind == "aliases":
                aliases = dict(e.aliases or {})
                self._try(p, f"alias update of {e.series}", lambda: p.aliases_moved(e.series, aliases))
            elif i in self._upload_failed:
                self._fail(f"{type(p).__name__}: remote delete of {e.series} v{e.number} ({e.name}) skipped "
                           "because an earlier upload failed")
            else:
                self._try(p, f"remote delete of {e.series} v{e.number} ({e.name})",
                          lambda: p.deleted(e.series, e.number, e.name))

    def _record(self, outcome: Callable[[str, bool], None], publisher: str, uploaded: bool, what: str) -> None:
        """Records an upload's status for the report; a failure to record it is reported as such and never keeps
        the next publishers from their turn."""
        try:
            outcome(publisher, uploaded)
        except Exception as err:  # reported at close(); the upload itself is unaffected
            self._fail(f"recording the upload status of {what} ({publisher}) in the history failed: "
                       f"{type(err).__name__}: {err}")

    def _try(self, publisher: Publisher, what: str, call: Callable[[], Any]) -> bool:
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                call()
                return True
            except Exception as err:  # reported below and at close(); the local checkpoint is safe
                last = (f"{type(publisher).__name__}: {what} failed after {attempt} attempt(s): "
                        f"{type(err).__name__}: {err}")
                if attempt < self.attempts:
                    log.warning("%s; retrying in %.0f s", last, delay)
                    self._sleep(delay)
                    delay *= 2
        self._fail(last)
        return False

    def _fail(self, message: str) -> None:
        log.error("keepbest: %s", message)
        with self._lock:
            self._failures.append(message)


def events_for(series: str, version: Version | None, aliases: Mapping[str, int],
               deleted: Sequence[Manifest], release: Callable[[], None] | None = None,
               outcome: Callable[[str, bool], None] | None = None) -> list[_Event]:
    """What one commit tells publishers: committed, aliases, then deletions.

    ``release`` frees the snapshot ``version.path`` once it was published; ``outcome(publisher, uploaded)``
    is told, for each publisher, whether its upload succeeded (the manager records it in the history).
    """
    out = [] if version is None else [_Event("committed", series, version=version, release=release,
                                             outcome=outcome)]
    out.append(_Event("aliases", series, aliases=dict(aliases)))
    out += [_Event("deleted", series, number=m.version, name=m.name) for m in deleted if m.version is not None]
    return out
