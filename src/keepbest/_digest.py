"""Digests: BLAKE3 for what keepbest writes, sha256 for manifests of keepbest 0.1.

BLAKE3 is a cryptographic hash like sha256 but several times faster and
parallel (measured on a 2-core AMD EPYC with SHA extensions: sha256 1.8 GB/s,
BLAKE3 4.7 GB/s on one thread, 9.2 GB/s on two), so hashing never dominates a
save or a load. Reading files to hash them is the store's business
(``keepbest.store``); this module only makes hashers.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import blake3

from keepbest.manifest import DIGESTS

DEFAULT = DIGESTS[0]


_here = threading.local()


def one_thread_here() -> None:
    """From now on, hashers made on the calling thread use that thread alone, whatever ``threads`` asks.

    For the background writer: it runs at a lower priority than training, but BLAKE3's pool of
    threads does not, since those threads are started once, by whichever thread first hashes in
    parallel, and keep that thread's priority. Hashing on the writer's own thread keeps the
    save's work below training (JAX, training on the CPU, 100 MB of weights, alternating runs:
    training blocked 76-139 ms per save instead of 105-186 ms, durable as soon; at 1 GB, 0.79 s
    instead of 1.53 s, though the machine's memcpy speed differed between those two runs).
    """
    _here.one_thread = True


def parallel_allowed() -> bool:
    """Whether a hasher made on this thread may use every core (see :func:`one_thread_here`)."""
    return not getattr(_here, "one_thread", False)


def new(algorithm: str = DEFAULT, *, threads: bool = False) -> Any:
    """A fresh hasher (``update``/``hexdigest``); ``threads`` lets BLAKE3 use every core."""
    if algorithm == "blake3":
        parallel = threads and parallel_allowed()
        return blake3.blake3(max_threads=blake3.blake3.AUTO if parallel else 1)
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"Unknown digest algorithm {algorithm!r}. Known: {', '.join(DIGESTS)}. "
                     f"Received: algorithm={algorithm!r}")


def of_bytes(data: bytes | memoryview, algorithm: str = DEFAULT) -> str:
    h = new(algorithm)
    h.update(data)
    return str(h.hexdigest())
