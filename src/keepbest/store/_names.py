"""How keepbest names what it writes in a checkpoint folder: formatted and parsed here only.

- Committed entries keep the user's name (``best.keras``, ``ckpt-0005``).
- ``.keepbest/`` (:data:`INDEX`) holds the manifests of file checkpoints and
  the records (aliases, leases, evaluations, end markers, history, upload
  snapshots).
- Work in progress carries its writer's *owner token*:
  ``<prefix><token>-<random>[-<tail of the name>]`` for staged data
  (:data:`TMP`), a folder moved aside during a replace (:data:`OLD`) and
  one being deleted (:data:`TRASH`); ``.keepbest-pending-<token>-<hash>.json``
  and ``.keepbest-deleting-<token>-<hash>.json`` in the index for a file
  checkpoint's commit intent and un-committed manifest.

A temp name never holds more than :data:`TAIL` characters of the final
name, so it fits wherever the final name fits (255 bytes on common
filesystems); a record or manifest file name that would not fit is
shortened with a digest of the full name.

The owner token is ``<host>.<pid namespace>.<pid>.<start time>``: a
digest of the host name, the inode of the writer's PID namespace, its pid
and its start time in clock ticks. :func:`liveness` tells a live writer's
files from a dead one's, and answers "unknown" (never "dead") for a writer
on another host or in another PID namespace, whose pids mean nothing here.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import sys
import urllib.parse

INDEX = ".keepbest"
MANIFEST = "manifest.json"
RESERVED = ".keepbest"  # no checkpoint name may start with it
TMP = ".keepbest-tmp-"
OLD = ".keepbest-old-"
TRASH = ".keepbest-trash-"
PENDING = ".keepbest-pending-"
DELETING = ".keepbest-deleting-"
LOCK = ".keepbest-records.lock"
COMMITTING = ".keepbest-committing-"  # object stores: one writer per checkpoint name, from stage to commit
GENERATION = ".keepbest-gen-"  # object stores: the files of a re-saved folder checkpoint
PROBE = ".keepbest-probe-"  # object stores: the object that checks that conditional writes are honoured
NAME_MAX = 255  # bytes in one path component on Linux, macOS and Windows filesystems
TAIL = 40  # characters of the final name kept in a temp name (its extension decides the format)
_RECORD_ROOM = NAME_MAX - len(".json") - 24  # room for the "-<time>-<random>" of a damaged copy

_TOKEN = re.compile(r"[0-9a-f]{8}\.\d+\.\d+\.\d+")
_LEGACY_TOKEN = re.compile(r"\d+(\.\d+)?")  # keepbest 0.2: <pid>[.<start time>], no host


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, Linux), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


def _pid_namespace() -> int:
    """The inode of this process's PID namespace (0 where the platform has none)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def host_id() -> str:
    return hashlib.blake2s(socket.gethostname().encode("utf-8"), digest_size=4).hexdigest()


_PID: int | None = None
_TOKEN_CACHE = ""


def owner_token() -> str:
    """Names this process in temp names: ``<host>.<pid namespace>.<pid>.<start time>``.

    A restarted process often gets the same pid (pid 1 in a container); the
    start time tells its leftovers from the files of a live writer.
    """
    global _PID, _TOKEN_CACHE
    pid = os.getpid()
    if pid != _PID:  # computed once per process (a fork gets its own)
        _PID, _TOKEN_CACHE = pid, f"{host_id()}.{_pid_namespace()}.{pid}.{_start_time(pid) or 0}"
    return _TOKEN_CACHE


ALIVE, DEAD, UNKNOWN = "alive", "dead", "unknown"


def liveness(token: str) -> str:
    """Whether the writer named by ``token`` still runs: ``alive``, ``dead`` or ``unknown``.

    ``unknown`` for another host, another PID namespace (a container on the
    same volume, ``unshare --pid``) and tokens of keepbest 0.2 (no host):
    files of such writers are never treated as leftovers.
    """
    if not _TOKEN.fullmatch(token):
        return UNKNOWN
    host, ns, pid_text, start_text = token.split(".")
    mine = owner_token().split(".")
    if host != mine[0] or ns != mine[1]:
        return UNKNOWN
    pid, start = int(pid_text), int(start_text)
    if pid == os.getpid():
        return ALIVE if str(start) == mine[3] else DEAD
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return DEAD
    except OSError:  # PermissionError: it exists, owned by someone else
        pass
    if start == 0 or sys.platform != "linux":
        return ALIVE  # it exists and no start time tells another process that reused its pid
    now = _start_time(pid)
    if now is None:  # it ended between the two looks
        return DEAD
    return ALIVE if now == start else DEAD


def _short(text: str) -> str:
    return hashlib.blake2s(text.encode("utf-8"), digest_size=8).hexdigest()


def _tail(name: str) -> str:
    return name if len(name) <= TAIL else name[-TAIL:]


def temp(prefix: str, name: str = "") -> str:
    """A fresh work-in-progress name: ``<prefix><token>-<random>[-<tail of name>]``."""
    head = f"{prefix}{owner_token()}-{os.urandom(4).hex()}"
    return f"{head}-{_tail(name)}" if name else head


def intent(prefix: str, name: str) -> str:
    """The pending/deleting record of a file checkpoint ``name``: ``<prefix><token>-<hash of name>.json``."""
    return f"{prefix}{owner_token()}-{_short(name)}.json"


def commit_lock(name: str) -> str:
    """The record in :data:`INDEX` that an object store's writer of checkpoint ``name`` holds while it
    writes: ``.keepbest-committing-<hash of name>.json`` (its owner is inside)."""
    return f"{COMMITTING}{_short(name)}.json"


def generation() -> str:
    """A fresh sub-folder name for the files of a re-saved folder checkpoint in an object store."""
    return f"{GENERATION}{os.urandom(6).hex()}"


def intent_glob(prefix: str, name: str) -> str:
    return f"{prefix}*-{_short(name)}.json"


def owner(entry: str, prefix: str) -> str | None:
    """The writer's token in a name made by :func:`temp` or :func:`intent`, or None if it is not one.

    Tokens of keepbest 0.2 (``<pid>[.<start>]``) are returned too; :func:`liveness` calls them unknown.
    """
    if not entry.startswith(prefix):
        return None
    head = entry[len(prefix) :].split("-", 1)[0]
    return head if _TOKEN.fullmatch(head) or _LEGACY_TOKEN.fullmatch(head) else None


def component(text: str) -> str:
    """``text`` as one file name (any characters, any length), the same every time.

    Quoted as keepbest 0.2 quoted series names (so its records are still
    found); a leading dot is quoted too, so no record looks like a temp
    name; a name too long for a path component is cut and completed with a
    digest of the whole.
    """
    safe = urllib.parse.quote(text, safe="") or "%00"
    if safe.startswith("."):
        safe = "%2E" + safe[1:]
    return _bounded(safe, text, _RECORD_ROOM)


def _bounded(safe: str, text: str, room: int) -> str:
    if len(safe.encode("utf-8")) <= room:
        return safe
    return safe.encode("utf-8")[: room - 18].decode("utf-8", "ignore") + "~" + _short(text)


MODEL_SUFFIXES = (".keras", ".weights.h5", ".h5", ".hdf5", ".safetensors", ".pt", ".pth", ".ckpt")
"""Files that look like a saved model; at the top level without a manifest they are reported as unmanaged."""


def is_model_file(name: str) -> bool:
    return name.lower().endswith(MODEL_SUFFIXES) and not name.startswith(RESERVED)


def manifest_file(name: str) -> str:
    """The file in :data:`INDEX` that holds the manifest of the file checkpoint ``name``.

    ``<name>.json`` as keepbest 0.2 wrote it, shortened (with a digest) only
    where that would not fit in a file name.
    """
    return _bounded(name, name, NAME_MAX - len(".json")) + ".json"


def check_name(name: str) -> str | None:
    """Why ``name`` cannot name a checkpoint (None when it can)."""
    if not name or "/" in name or "\\" in name or "\x00" in name or name in (".", ".."):
        return "it must be a plain, non-empty file or folder name (no '/')"
    if name.startswith(RESERVED):
        return "names starting with '.keepbest' are reserved by keepbest"
    if len(os.fsencode(name)) > NAME_MAX:
        return f"it is {len(os.fsencode(name))} bytes long; file names hold at most {NAME_MAX}"
    return None
