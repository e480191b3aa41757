"""The S3 SIGKILL harness, shared by ``test_s3_kill.py`` (50 kills) and ``scripts/s3_kill_soak.py`` (200).

A first child (``s3_kill_child.py``) runs to the end and prints every request it sends: the *trace*. Then
each trial starts a child on a fresh prefix that SIGKILLs itself before its request N, and does what the
next run would do. Half the trials draw N uniformly from the trace; the other half pick, in turn, each kind
of request the trace holds (``PutObject manifest``, ``DeleteObject lock``, ``UploadPart data`` ...), so the
rare ones (a commit, a lock release) are hit in every run, not only by luck. Two children run at a time.
Every outcome is counted, not asserted, so a long run reports all of them:

- ``lost``: after ``recover()``, a checkpoint the child reported committed (the fixed-name ``best`` folder,
  the ``best.bin`` file, the series' best by ``val_loss``) is gone or holds an older save, and no newer
  save that was in flight replaced it;
- ``partial``: a listed checkpoint that is damaged, does not verify, or holds other bytes than its own
  save wrote (after ``recover()``; before it too, unless it is a file checkpoint that a dead writer's
  commit lock names: it was being re-saved in place, so it is counted as ``pending``, what ``recover()``
  must roll forward or back, and checked again after it);
- ``orphans``: after ``recover()``, anything ``orphans()`` still reports, a commit lock, an unfinished
  multipart upload, or an object that neither a committed checkpoint nor a record accounts for;
- ``failed``: ``recover()`` raised, or the child failed other than by its SIGKILL.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from keepbest import codec
from keepbest.errors import KeepbestError
from keepbest.manager import STATE_FILE
from keepbest.manifest import Manifest
from keepbest.store import INDEX, MANIFEST, object as s3_store
from keepbest.store.object import ObjectStore

from .s3_kill_child import file_bytes, is_big, state, val_loss

CHILD = Path(__file__).with_name("s3_kill_child.py")
ROUNDS = 3  # rounds of (series, best, best.bin) saves per child: every kind big once, retention deletes
CHILD_TIMEOUT = 180.0
LOCKS = f"{INDEX}/.keepbest-committing-"


@dataclass
class Child:
    """What one child printed, and how it ended."""

    lines: list[str]
    returncode: int
    stderr: str

    def words(self, first: str) -> list[list[str]]:
        return [line.split()[1:] for line in self.lines if line.split()[:1] == [first]]

    @property
    def killed_at(self) -> tuple[int, str] | None:
        """(request number, "<operation> <kind of key>") of the request the child died before."""
        kills = self.words("kill")
        return (int(kills[0][0]), label(kills[0][1], kills[0][2])) if kills else None

    def ended(self, kind: str) -> list[int]:
        return [int(w[2]) for w in self.words("end") if w[0] == kind]

    def in_flight(self, kind: str) -> int | None:
        """The save of ``kind`` begun and never reported committed (the child died inside it)."""
        begun = [int(w[1]) for w in self.words("begin") if w[0] == kind]
        return begun[-1] if begun and begun[-1] not in self.ended(kind) else None

    @property
    def phase(self) -> str:
        """What the child was doing when it died: ``saving best 2``, ``between saves``, ``starting``."""
        begun, ended = self.words("begin"), self.words("end")
        if not begun:
            return "starting"
        return "between saves" if len(ended) == len(begun) else f"saving {begun[-1][0]} {begun[-1][1]}"


@dataclass
class Summary:
    seed: int
    trials: int = 0
    kills: int = 0
    lost: int = 0
    partial: int = 0
    pending: int = 0
    orphans: int = 0
    failed: int = 0
    requests: list[int] = field(default_factory=list)
    labels: Counter[str] = field(default_factory=Counter)
    phases: Counter[str] = field(default_factory=Counter)
    trace_length: int = 0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"S3 kills {self.kills} in {self.trials} trials: previous bests lost {self.lost}, partial "
                f"checkpoints visible {self.partial}, orphans left after gc {self.orphans}, failures "
                f"{self.failed} (pending for gc before it ran: {self.pending}) (seed {self.seed})")

    def figures(self) -> str:
        """The distribution of the kills: request numbers, kinds of request, what the child was saving."""
        if not self.requests:
            return "no kills"
        q = np.percentile(self.requests, [0, 25, 50, 75, 100]).astype(int).tolist()
        return "\n".join([
            f"request numbers (of {self.trace_length} in a full run): {len(set(self.requests))} distinct, "
            f"min/25%/median/75%/max {q}",
            "killed before: " + ", ".join(f"{k} {n}" for k, n in self.labels.most_common()),
            "killed while: " + ", ".join(f"{k} {n}" for k, n in sorted(self.phases.items())),
        ])

    def note(self, kind: str, count: int, text: str) -> None:
        setattr(self, kind, getattr(self, kind) + count)
        self.problems.append(f"{kind}: {text}")


def label(operation: str, key: str) -> str:
    """The kind of a request: its operation and what its key is (``PutObject manifest``)."""
    parts = key.split("/")
    if key == "-":
        what = "prefix"
    elif key.startswith(LOCKS):
        what = "lock"
    elif key.startswith(f"{INDEX}/.keepbest-probe-"):
        what = "probe"
    elif parts[-1] == MANIFEST or (len(parts) == 2 and parts[0] == INDEX):
        what = "manifest"
    elif parts[0] == INDEX:
        what = "record"
    else:
        what = "data"
    return f"{operation} {what}"


def run_child(url: str, n: int, cache: Path) -> Child:
    """Runs the child until it exits (by its own SIGKILL before request ``n``, or at the end)."""
    env = {**os.environ, "KEEPBEST_CACHE_DIR": str(cache)}  # a killed child's staged files go with `cache`
    proc = subprocess.Popen([sys.executable, str(CHILD), url, str(n), str(ROUNDS)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err += f"\n(killed by the harness after {CHILD_TIMEOUT:g} s)"
    return Child(out.splitlines(), proc.returncode, err)


def trace(server: Any, workdir: Path) -> list[str]:
    """The kind of every request of a full run, in order (``trace[0]`` is request 1)."""
    url = server.url("s3kill-trace")
    child = run_child(url, -1, workdir / "trace")
    if child.returncode != 0:
        raise RuntimeError(f"the S3 kill child failed without a kill (status {child.returncode}):\n"
                           f"{child.stderr[-3000:]}")
    _remove_prefix(server, url)
    return [label(w[1], w[2]) for w in child.words("req")]


def draws(rng: random.Random, kinds: list[str], count: int) -> list[int]:
    """``count`` request numbers: every other one uniform, the others a random request of each kind in turn."""
    by_kind: dict[str, list[int]] = {}
    for number, kind in enumerate(kinds, start=1):
        by_kind.setdefault(kind, []).append(number)
    rare = sorted(by_kind)
    out = []
    for i in range(count):
        if i % 2 == 0:
            out.append(rng.randint(1, len(kinds)))
        else:
            out.append(rng.choice(by_kind[rare[(i // 2) % len(rare)]]))
    return out


def run(server: Any, kills: int, seed: int, parallel: int = 2, progress: Any = None) -> Summary:
    """Trials until ``kills`` children died by their SIGKILL (at most twice as many trials)."""
    rng = random.Random(seed)
    summary = Summary(seed)
    with tempfile.TemporaryDirectory(prefix="keepbest-s3kill-") as tmp:
        kinds = trace(server, Path(tmp))
        summary.trace_length = len(kinds)
        with ThreadPoolExecutor(parallel) as pool:
            while summary.kills < kills and summary.trials < 2 * kills:
                todo = draws(rng, kinds, kills - summary.kills)
                trials = [pool.submit(trial, server, n, Path(tmp) / f"t{summary.trials + i}")
                          for i, n in enumerate(todo)]
                for n, future in zip(todo, trials):
                    child, found = future.result()
                    summary.trials += 1
                    _count(summary, n, child, found)
                    if progress is not None:
                        progress(summary)
    return summary


@dataclass
class Found:
    lost: list[str] = field(default_factory=list)
    partial: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def trial(server: Any, n: int, cache: Path) -> tuple[Child, Found]:
    """One child killed before request ``n`` on a fresh prefix, then checked as the next run would."""
    url = server.url("s3kill")
    try:
        child = run_child(url, n, cache)
        found = Found()
        if child.returncode not in (0, -signal.SIGKILL) or (child.returncode == 0 and child.killed_at):
            found.failed.append(f"child exited with status {child.returncode}: {child.stderr[-2000:]}")
            return child, found
        check(server, url, child, found)
        return child, found
    finally:
        _remove_prefix(server, url)
        shutil.rmtree(cache, ignore_errors=True)


def _count(summary: Summary, n: int, child: Child, found: Found) -> None:
    killed = child.killed_at
    where = f"N={n}, killed before {killed}, while {child.phase}"
    if killed is not None:
        summary.kills += 1
        summary.requests.append(killed[0])
        summary.labels[killed[1]] += 1
        summary.phases[" ".join(child.phase.split()[:2])] += 1  # "saving best", without the step
    for kind in ("lost", "partial", "pending", "orphans", "failed"):
        items = getattr(found, kind)
        if items:
            summary.note(kind, len(items), f"{'; '.join(items)} ({where})")


def check(server: Any, url: str, child: Child, found: Found) -> None:
    """(a) what a reader sees before gc, (b) the last committed saves after gc, (c) nothing left over."""
    store = s3_store.open(url)
    # Only a file checkpoint re-saved in place may be seen damaged before gc (its object is overwritten
    # before its manifest: the intent in the lock lets gc finish or undo that); anything else is partial.
    locks = filter(None, (store.read_lock(key) for key in store.bucket.listing(LOCKS)))
    locked = {str(doc.get("name")) for doc, _etag in locks if doc.get("layout") == "file"}
    before = store.list()
    for d in before.damaged:
        (found.pending if d.name in locked else found.partial).append(f"listed damaged before gc: {d.reason}")
    verified = set()
    for m in before.manifests:
        problem = _unverified(store, m)
        if problem:
            (found.pending if m.name in locked else found.partial).append(f"before gc: {problem}")
        else:
            verified.add(m.to_json())
    try:
        store.recover()
    except Exception as e:  # noqa: BLE001 - counted and reported, like every other outcome
        found.failed.append(f"recover() raised {type(e).__name__}: {e}")
        return
    after = store.list()
    found.partial += [f"listed damaged after gc: {d.reason}" for d in after.damaged]
    listed = {m.name: m for m in after.manifests}
    for m in after.manifests:  # (one that verified before gc and is unchanged is not downloaded twice more)
        problem = (None if m.to_json() in verified else _unverified(store, m)) or _not_its_own(store, m)
        if problem:
            found.partial.append(f"after gc: {problem}")
    _check_bests(child, listed, found)
    _check_leftovers(server, url, store, after.manifests, found)


def _unverified(store: ObjectStore, m: Manifest) -> str | None:
    try:
        store.verify(m)
    except (KeepbestError, OSError) as e:
        return f"{m.name} does not verify: {e}"
    return None


def _not_its_own(store: ObjectStore, m: Manifest) -> str | None:
    """Whether the checkpoint holds other bytes than save ``m.step`` of its kind wrote (a mix of saves)."""
    def read(rel: str) -> bytes:
        got = store.bucket.get(store.data_key(m.name, m.layout, m.files_under, rel))
        if got is None:
            raise FileNotFoundError(rel)
        return got[0]

    step = int(m.step or 0)
    if m.layout == "file":
        same = read(m.name) == file_bytes(step, is_big("file", step))
    else:
        expected = state(step, is_big("best" if m.name == "best" else "series", step))
        got = codec.load(read, STATE_FILE)
        same = got.keys() == expected.keys() and all(np.array_equal(got[k], v) for k, v in expected.items())
    return None if same else f"{m.name} (step {step}) holds other bytes than save {step} wrote"


def _check_bests(child: Child, listed: dict[str, Manifest], found: Found) -> None:
    for kind, name in (("best", "best"), ("file", "best.bin")):
        ended, flying = child.ended(kind), child.in_flight(kind)
        m = listed.get(name)
        allowed = {*ended[-1:], *([flying] if flying is not None else [])}
        if m is None:
            if ended:
                found.lost.append(f"{name} is gone; save {ended[-1]} of it was committed")
        elif m.step not in allowed:
            (found.lost if ended and (m.step or 0) < ended[-1] else found.partial).append(
                f"{name} holds save {m.step}; the child committed {ended[-1:]}, was saving {flying}")
    ended, flying = child.ended("series"), child.in_flight("series")
    if ended:
        best = min(ended, key=val_loss)
        better = flying is not None and val_loss(flying) < val_loss(best) and f"run-{flying:09d}" in listed
        if f"run-{best:09d}" not in listed and not better:
            found.lost.append(f"the series' best run-{best:09d} (val_loss {val_loss(best)}) is gone")
    allowed_steps = {*ended, *([flying] if flying is not None else [])}
    strays = [n for n, m in listed.items() if n.startswith("run-") and m.step not in allowed_steps]
    if strays:
        found.partial.append(f"series checkpoints {strays} were never saved by the child")


def _check_leftovers(server: Any, url: str, store: ObjectStore, manifests: list[Manifest], found: Found) -> None:
    orphans = store.orphans()
    found.orphans += [f"orphans() after gc: {x}" for x in orphans.dead + orphans.undecided + orphans.stale]
    found.orphans += [f"unfinished upload {key}" for key in server.uploads(url)]
    referenced = set()
    for m in manifests:
        referenced.add(store.manifest_key(m.name, m.layout))
        referenced |= {store.data_key(m.name, m.layout, m.files_under, f.path) for f in m.files}
    for key in server.keys(url):
        record = key.startswith(f"{INDEX}/") and key.count("/") >= 2  # .keepbest/<kind>/.../<key>.json
        if key not in referenced and not record:
            found.orphans.append(f"object {key} belongs to no committed checkpoint or record")


def _remove_prefix(server: Any, url: str) -> None:
    """Frees the server's memory: every trial writes tens of MB under its own prefix."""
    client = server.client()
    bucket, prefix = _bucket_and_prefix(url)
    for key in server.keys(url):
        client.delete_object(Bucket=bucket, Key=f"{prefix}/{key}")
    for upload in client.list_multipart_uploads(Bucket=bucket, Prefix=f"{prefix}/").get("Uploads", []):
        client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])


def _bucket_and_prefix(url: str) -> tuple[str, str]:
    bucket, _, prefix = url[len("s3://"):].partition("/")
    return bucket, prefix.rstrip("/")

