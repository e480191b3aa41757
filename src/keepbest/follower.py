"""Following the checkpoints that training commits: the framework-free half of a sidecar evaluator.

A :class:`Follower` hands out committed checkpoints one at a time, in commit
order (``every``: each one, none skipped) or newest first (``latest``: jump to
the newest one not evaluated yet). It holds a lease in the checkpoint folder
(see :mod:`keepbest.evaluation`) so that training's retention keeps what it is
evaluating and, in ``every`` mode, what it has not evaluated yet; a
background thread renews it. It records each evaluation beside the checkpoint
and what it has done, so a restarted follower continues where it stopped.

Example:
    >>> import tempfile, numpy as np
    >>> from keepbest import CheckpointManager
    >>> mgr = CheckpointManager(tempfile.mkdtemp(), series="ckpt")
    >>> _ = mgr.save(1, {"w": np.zeros(2, np.float32)}, epoch=1)
    >>> mgr.mark_training_end()
    >>> with Follower(mgr.directory) as follower:
    ...     while (ckpt := follower.next()) is not None:
    ...         follower.begin(ckpt)
    ...         follower.done(ckpt, {"loss": 0.5})
    >>> follower.stop_reason, follower.state.evaluations
    ('training ended', 1)
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Mapping, Sequence

from keepbest import evaluation, progress, store as stores
from keepbest.checkpoint import Checkpoint
from keepbest.errors import CheckpointNotFoundError, CorruptCheckpointError
from keepbest.evaluation import EvaluatorState, commit_id
from keepbest.manifest import Manifest
from keepbest.store import RecordConflictError


RETRY_DELAYS = (0.2, 0.5, 1.0)  # a checkpoint that fails to load is tried this many more times


class EvaluatorConflictError(RuntimeError):
    """Another live evaluator already follows this folder under the same name."""


class Follower:
    """Hands out the checkpoints of ``directory`` that are due for evaluation.

    Args:
        directory: the folder training saves checkpoints into.
        name: this evaluator's name; its lease and progress are stored under
            it, so evaluators with different data need different names.
        mode: ``"every"`` (each committed checkpoint, in commit order; retention
            keeps the ones not evaluated yet) or ``"latest"`` (the newest not yet
            evaluated; older ones are skipped).
        series: only follow checkpoints of these filepath templates (None: all).
        lease_ttl: seconds after the last heartbeat before training's retention
            stops honouring the lease (a killed evaluator blocks deletion no
            longer than this). Heartbeats come every ``lease_ttl / 4``.
        poll_interval: longest wait between looks where file events are missing (local folders without
            inotify, and buckets: one LIST request per look).
        storage_options: passed to s3fs for an ``s3://`` directory (else the AWS environment is used).
    """

    def __init__(self, directory: str | os.PathLike[str], *, name: str = "eval", mode: str = "every",
                 series: Sequence[str] | None = None, lease_ttl: float = 120.0, poll_interval: float = 0.5,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        if mode not in evaluation.MODES:
            raise ValueError(f"mode must be 'every' (evaluate each checkpoint) or 'latest' (jump to the newest). "
                             f"Received: mode={mode!r}")
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"name must be a plain file name (it names the evaluator's records). Received: name={name!r}")
        if not lease_ttl > 0:
            raise ValueError(f"lease_ttl must be a positive number of seconds. Received: lease_ttl={lease_ttl!r}")
        self.store = stores.open(directory, storage_options)
        self.name = name
        self.mode = mode
        self.series = None if series is None else list(series)
        self.lease_ttl = float(lease_ttl)
        self.state = EvaluatorState(name=name, mode=mode, series=self.series, ttl=self.lease_ttl)
        self.stop_reason: str | None = None
        self.unreadable: list[str] = []  # manifests that cannot be read, each reported once, in order seen
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._watch = self.store.watch(poll_interval, records=(self.store.record_key(evaluation.ENDED),))
        self._backlog: progress.Bar | None = None

    # -- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> "Follower":
        self.open()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(release=exc_type is None)

    def open(self) -> None:
        """Takes the lease (continuing the progress recorded under this name) and starts heartbeats."""
        while True:
            now = time.time()
            previous, token = evaluation.read_state(self.store, self.name)
            if previous is not None and previous.owner != evaluation.lease_owner() and previous.holds_lease(now) \
                    and evaluation.owner_is_alive(previous):
                raise EvaluatorConflictError(
                    f"Another evaluator named '{self.name}' follows {self.store.where()} (process "
                    f"{previous.owner.split('.')[-2] if previous.owner.count('.') == 3 else previous.owner} on "
                    f"{previous.host}, heartbeat {now - previous.heartbeat:.0f} s ago). Stop it, or give this one "
                    f"another name=. Received: name={self.name!r}")
            if previous is not None:
                self.state.evaluated = previous.evaluated
                self.state.quarantined = previous.quarantined
                self.state.evaluations = previous.evaluations
                self.state.watermark = previous.watermark
            self.state.owner, self.state.host = evaluation.lease_owner(), evaluation.this_host()
            self.state.active, self.state.evaluating = True, None
            try:  # compare-and-swap: two evaluators starting at once never both take the lease
                self._save_state(expect=token)
                break
            except RecordConflictError:
                continue
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="keepbest-lease", daemon=True)
        self._heartbeat.start()

    def close(self, release: bool = True) -> None:
        """Stops heartbeats. ``release`` gives the lease up at once; otherwise it lapses after ``lease_ttl``.

        A follower that stops because of an error keeps its lease until it
        lapses, so a restart soon after still finds every checkpoint it had
        not evaluated.
        """
        self._stop.set()
        self._track_backlog(0)
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        if release:
            with self._lock:
                self.state.active, self.state.evaluating = False, None
                self._save_state()
        self._watch.close()

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_ttl / 4):
            with self._lock:
                self._save_state()

    def _save_state(self, expect: str | None = stores.ANY) -> None:
        """Writes the state with a fresh heartbeat; forgets ids of checkpoints that are gone."""
        live = {commit_id(m) for m in self._committed()}
        self.state.evaluated = [c for c in self.state.evaluated if c in live]
        self.state.quarantined = {c: e for c, e in self.state.quarantined.items() if c in live}
        self.state.heartbeat = time.time()
        evaluation.write_state(self.store, self.state, expect)

    # -- what is due ---------------------------------------------------------------------
    def _committed(self) -> list[Manifest]:
        listing = self.store.list()
        for damaged in listing.damaged:  # never handed out, but said once
            if damaged.reason not in self.unreadable:
                self.unreadable.append(damaged.reason)
        manifests = [m for m in listing.manifests if self.state.follows(m)]
        return sorted(manifests, key=lambda m: (m.created, m.name))

    def pending(self) -> list[Manifest]:
        """Committed checkpoints due for evaluation, oldest first."""
        due = [m for m in self._committed() if not self.state.done(commit_id(m))]
        if self.mode == "latest":
            due = [m for m in due if m.created > self.state.watermark]
        return due

    def _training_ended(self, committed: list[Manifest]) -> bool:
        ended = evaluation.ended_series(self.store)
        if not ended:
            return False
        wanted = {m.series for m in committed} | set(self.series or ())
        return wanted <= set(ended) if wanted else True

    def next(self, idle_timeout: float | None = None) -> Checkpoint | None:
        """Blocks until a checkpoint is due and returns it; None once training has ended and
        nothing is left (``stop_reason`` says why), or after ``idle_timeout`` seconds without one."""
        started = time.monotonic()
        look = True
        while True:
            if look:
                due = self.pending()
                self._track_backlog(len(due))
                if due:
                    m = due[0] if self.mode == "every" else due[-1]
                    return Checkpoint(m, self.store.where(m.name), store=self.store)
                if self._training_ended(self._committed()):
                    self.stop_reason = "training ended"
                    return None
            waited = time.monotonic() - started
            if idle_timeout is not None and waited >= idle_timeout:
                self.stop_reason = f"no new checkpoint for {idle_timeout:g} s (idle_timeout)"
                return None
            left = 1.0 if idle_timeout is None else min(1.0, idle_timeout - waited)
            look = self._watch.wait(max(left, 0.0))  # a bucket is listed again only once it changed

    def _track_backlog(self, waiting: int) -> None:
        """A progress bar while more than one checkpoint waits (a sidecar started late, or slower than training)."""
        if self._backlog is None and waiting > 1 and self.mode == "every":
            self._backlog = progress.bar(f"{self.name}: evaluating the backlog", waiting, unit="checkpoints")
        elif self._backlog is not None and waiting == 0:
            self._backlog.close()
            self._backlog = None
        elif self._backlog is not None:
            self._backlog.set_total(self._backlog.done + waiting)

    def due(self, max_evaluations: int | None = None, idle_timeout: float | None = None) -> Checkpoint | None:
        """The next checkpoint to evaluate, or None once the evaluator should stop (``stop_reason`` says why):
        after ``max_evaluations`` evaluations (counted across restarts), or when :meth:`next` gives none."""
        if max_evaluations is not None and self.state.evaluations >= max_evaluations:
            self.stop_reason = f"max_evaluations={max_evaluations} reached"
            return None
        return self.next(idle_timeout)

    def verify(self, ckpt: Checkpoint) -> None:
        """Re-hashes ``ckpt``'s files (raises as :meth:`keepbest.store.Store.verify` does), ready to be read."""
        self.store.verified_reader(ckpt.manifest)

    def replacing(self, ckpt: Checkpoint) -> bool:
        """Whether a live writer is half-way through saving ``ckpt``'s name again (a mismatch is not damage)."""
        return self.store.replacing(ckpt.name)

    def still_committed(self, ckpt: Checkpoint) -> bool:
        """Whether ``ckpt`` is still the committed version under its name."""
        cid = commit_id(ckpt.manifest)
        return any(commit_id(m) == cid for m in self.store.list().manifests)

    # -- recording -----------------------------------------------------------------------
    def begin(self, ckpt: Checkpoint) -> None:
        """Pins ``ckpt`` (retention keeps it) while it is evaluated."""
        with self._lock:
            self.state.evaluating = commit_id(ckpt.manifest)
            self._save_state()

    def done(self, ckpt: Checkpoint, metrics: Mapping[str, float], seconds: float | None = None) -> None:
        """Records an evaluation beside the checkpoint and in the progress; unpins it."""
        evaluation.write_record(self.store, self.name, ckpt.manifest, metrics=metrics, seconds=seconds)
        with self._lock:
            self.state.evaluated.append(commit_id(ckpt.manifest))
            self.state.evaluations += 1
            self.state.watermark = max(self.state.watermark, ckpt.manifest.created)
            self.state.evaluating = None
            self._save_state()
        if self._backlog is not None:
            self._backlog.advance(1)
        evaluation.prune_records(self.store, self.store.list().manifests, self.name)

    def quarantine(self, ckpt: Checkpoint, error: BaseException) -> None:
        """Records that ``ckpt`` cannot be read, so it is never tried again; unpins it."""
        reason = f"{type(error).__name__}: {error}"
        evaluation.write_record(self.store, self.name, ckpt.manifest, quarantined=reason)
        with self._lock:
            self.state.quarantined[commit_id(ckpt.manifest)] = reason
            self.state.evaluating = None
            self._save_state()

    def skip(self, ckpt: Checkpoint) -> None:
        """Unpins a checkpoint that vanished or was replaced before it could be read."""
        with self._lock:
            self.state.evaluating = None
            self._save_state()

    def load(self, ckpt: Checkpoint, restore: Callable[[Checkpoint], None], say: Callable[[str], None] | None = None,
             who: str = "SidecarEvaluator") -> bool:
        """Verifies ``ckpt`` and runs ``restore(ckpt)`` (a framework's load); False when it vanished, was
        replaced or is quarantined. A failed load is tried again after short waits (the checkpoint may have been
        replaced while it was read); one that still fails is quarantined (skipped from then on)."""
        error: Exception | None = None
        for attempt, delay in enumerate((0.0, *RETRY_DELAYS)):
            time.sleep(delay)
            if attempt and not self.still_committed(ckpt):
                break
            try:
                self.verify(ckpt)
                restore(ckpt)
            except CheckpointNotFoundError:  # deleted or saved again while it was read
                break
            except (CorruptCheckpointError, OSError) as e:  # replaced or deleted meanwhile, or damaged: look again
                error = e
                continue
            if self.still_committed(ckpt):  # nothing replaced it while it was read
                return True
            break
        else:
            assert error is not None
            if self.replacing(ckpt):  # a commit is half-way: its manifest comes next
                self.skip(ckpt)
                return False
            self.quarantine(ckpt, error)
            if say is not None:
                say(f"{who}: quarantined {ckpt.name}: it still fails after {len(RETRY_DELAYS) + 1} attempts "
                    f"({error}). It is skipped; the next checkpoint follows.")
            return False
        self.skip(ckpt)
        if say is not None:
            say(f"{who}: {ckpt.name} was deleted or saved again while it was read; moving on.")
        return False
