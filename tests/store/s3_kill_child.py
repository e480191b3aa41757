"""A saving process that SIGKILLs itself at its N-th S3 request (run by ``s3_kill_harness.py``).

    python s3_kill_child.py <s3 url> <kill at request N: 0 never, -1 never but trace> <rounds>

Framework-free (numpy and keepbest only), so it starts fast. Each round saves, in this order:

- ``series``: a checkpoint of series ``run`` (``run-<step>``) under ``KeepLast(2)`` with a ``val_loss``
  that is not monotone, so retention deletes older checkpoints while the best sits among them;
- ``best``: the folder checkpoint ``best`` re-saved under its fixed name (a new generation each time);
- ``file``: the file checkpoint ``best.bin`` re-saved in place (the intent-in-the-lock path).

Some saves (:func:`is_big`) are over twice :data:`keepbest.store._object_io.PART`, so their uploads are
multipart with several parts in flight; the others are a few MB (one PUT per file).

Every request the store's s3fs client sends is counted by a botocore ``before-send`` hook; at request N the
process prints ``kill <N> <operation> <key>`` and SIGKILLs itself before that request leaves, so requests
1..N-1 are what the server saw (parts of one upload are in flight together).
Each save is announced on stdout before (``begin <kind> <value>``) and after it committed
(``end <kind> <name> <value>``); ``done <requests>`` ends a run that was not killed. The content of a save
is a function of its value (:func:`content`), so the parent can tell which save a checkpoint holds.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import urllib.parse
from dataclasses import dataclass
from typing import Any

import numpy as np

from keepbest import CheckpointManager, KeepLast, Monitor
from keepbest.manifest import FileEntry
from keepbest.store import Staged
from keepbest.store._object_io import PART

BIG = 2 * PART + (1 << 20)  # bytes of a multipart file: two full parts and a tail
SMALL = 3 << 19  # a few MB in all, but each tensor over 1 MiB, so a folder checkpoint has a shard file


def content(value: int, nbytes: int, salt: int = 0) -> np.ndarray:
    """``nbytes`` of uint32 that only save ``value`` writes (every word differs from other saves')."""
    words = np.arange(nbytes // 4, dtype=np.uint32)
    words *= np.uint32(2654435761)
    words += np.uint32((value * 7919 + salt) & 0xFFFFFFFF)
    return words


def state(value: int, big: bool) -> dict[str, np.ndarray]:
    """A folder checkpoint's tensors: several shard files (tensors of 1 MiB or more get their own)."""
    first = BIG if big else SMALL
    return {"a": content(value, first, 1), "b": content(value, 1 << 20, 2), "c": content(value, 4096, 3)}


def file_bytes(value: int, big: bool) -> bytes:
    return content(value, BIG + 12_344 if big else SMALL - 4_320, 4).tobytes()


def is_big(kind: str, step: int) -> bool:
    """Whether save ``step`` of ``kind`` is multipart: one kind or two in every round but the third."""
    return step % 3 == (1 if kind == "best" else 2)


def val_loss(step: int) -> float:
    """Not monotone: every third step is a new best, the others are worse than it."""
    return 100.0 - step + (0.0 if step % 3 == 0 else 5.0)


@dataclass(frozen=True)
class BytesPayload:
    """A file checkpoint written into the staged local path, as a framework's own writer would."""

    data: bytes
    layout: str = "file"
    format: str = "bytes"
    detached: bool = True

    def write(self, staged: Staged) -> tuple[FileEntry, ...]:
        staged.local_path().write_bytes(self.data)
        return ()


def kill_at(store: Any, n: int) -> None:
    """SIGKILLs this process when its store's client is about to send request ``n`` (``n`` < 0: never, but
    every request is printed as ``req <number> <operation> <key>``, the trace the parent draws N from)."""
    fs = store.bucket.fs
    fs.connect()  # s3fs creates its aiobotocore client lazily: make it now, so the hook is on the one used
    root = f"/{store.bucket.bucket}/{store.bucket.prefix}/"
    sent = 0

    def count(event_name: str, request: Any, **_kwargs: Any) -> None:
        nonlocal sent
        sent += 1
        if sent == n or n < 0:
            path = urllib.parse.unquote(urllib.parse.urlsplit(request.url).path)
            key = path[len(root):] if path.startswith(root) else "-"  # "-": a list of the prefix
            print("kill" if sent == n else "req", sent, event_name.rsplit(".", 1)[-1], key or "-", flush=True)
        if sent == n:
            os.kill(os.getpid(), signal.SIGKILL)

    fs.s3.meta.events.register("before-send.s3", count)
    atexit.register(lambda: print(f"done {sent}", flush=True))


def say(*words: object) -> None:
    print(*words, flush=True)


def main() -> None:
    url, n, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    from keepbest import store as stores

    kill_at(stores.open(url), n)  # the same (cached) s3fs filesystem every store of this process uses
    series = CheckpointManager(url, series="run", monitor=Monitor("val_loss", "min"), keep=[KeepLast(2)])
    bests = CheckpointManager(url, series="bests")
    for step in range(1, rounds + 1):
        say("begin series", step)
        saved = series.save(step, state(step, is_big("series", step)), metrics={"val_loss": val_loss(step)})
        say("end series", saved.name, step)
        say("begin best", step)
        bests.save(step, state(step, is_big("best", step)), name="best")
        say("end best best", step)
        say("begin file", step)
        bests.save(step, BytesPayload(file_bytes(step, is_big("file", step))), name="best.bin")
        say("end file best.bin", step)
    series.close()
    bests.close()


if __name__ == "__main__":
    main()
