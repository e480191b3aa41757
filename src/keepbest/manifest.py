"""The JSON manifest that describes one committed checkpoint.

A manifest is the commit record: a checkpoint exists for keepbest exactly
when its manifest does. It lists every file with its size and digest (BLAKE3;
manifests of keepbest 0.1 used sha256, still read), the series' version
number, the training position (``step``, ``epoch``, ``batch``), the metrics at save time,
which metric decides "best" and the versions of what wrote it.

Decoding is strict: wrong types, unknown layouts and file paths that would
escape the checkpoint directory raise :class:`CorruptCheckpointError` naming
the manifest, so a tampered manifest never points a reader elsewhere.

Example:
    >>> m = Manifest(name="ckpt-1", layout="dir", format="tensors", series="ckpt-{step}",
    ...              step=1, created=0.0)
    >>> Manifest.from_json(m.to_json(), source="example").step
    1
"""

from __future__ import annotations

import json
import math
import posixpath
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from keepbest.errors import CorruptCheckpointError

FORMAT = "keepbest/checkpoint"
FORMAT_VERSION = 2  # 2: file digests are BLAKE3 (version 1 had sha256 only)
DIGESTS = ("blake3", "sha256")  # what a file entry may carry; the first is what keepbest writes
LAYOUTS = ("file", "dir")
MODES = ("min", "max")

_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint, relative to the checkpoint's base directory."""

    path: str
    size: int
    digest: str
    algorithm: str = DIGESTS[0]


@dataclass(frozen=True)
class MonitorRecord:
    """The metric that decided "best" for the writer of this checkpoint."""

    name: str
    mode: str


@dataclass(frozen=True)
class Manifest:
    """The commit record of one checkpoint.

    ``epoch`` and ``batch`` are 1-based, as in Keras file name templates;
    ``step`` is the global optimizer step. Non-finite metric values are kept
    (they are facts about training) but can never make a checkpoint "best".
    """

    name: str
    layout: str
    format: str
    series: str
    step: int | None = None
    epoch: int | None = None
    batch: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    monitor: MonitorRecord | None = None
    created: float = 0.0
    files: tuple[FileEntry, ...] = ()
    versions: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    version: int | None = None
    """The series' version number (v0, v1, ...), counted per series; None before keepbest 0.3."""
    files_under: str = ""
    """Where a folder checkpoint's files are inside its folder ("" : in the folder itself). An object
    store writes a re-saved folder checkpoint's files under a fresh sub-folder instead of over the
    committed ones, so the previous checkpoint stays whole until the new manifest replaces it."""
    stall: float | None = None
    """Seconds the caller's thread spent in the save before its writing went to the background (waiting for
    the previous save, copying the snapshot; with a live payload, writing it too); None where not recorded
    (older manifests). A synchronous save blocks the caller for ``stall + persist``."""
    persist: float | None = None
    """Seconds from the end of the caller's part (``stall``) to the commit: writing the files in the background
    (a live payload's files were written in the stall), without the manifest write itself. Each second of a
    save counts in one of the two."""
    reused_bytes: int | None = None
    """Bytes of ``files`` reused from the previous checkpoint instead of written (dedup); bytes written are
    ``size - reused_bytes``. None where not recorded."""

    @property
    def monitor_value(self) -> float | None:
        """The monitored metric's value at save time, or None when absent."""
        if self.monitor is None:
            return None
        return self.metrics.get(self.monitor.name)

    def with_files(self, files: tuple[FileEntry, ...]) -> "Manifest":
        return replace(self, files=files)

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "layout": self.layout,
            "payload": self.format,
            "series": self.series,
            "step": self.step,
            "epoch": self.epoch,
            "batch": self.batch,
            "metrics": {k: _encode_float(v) for k, v in self.metrics.items()},
            "monitor": None
            if self.monitor is None
            else {"name": self.monitor.name, "mode": self.monitor.mode},
            "created": self.created,
            "files": [{"path": f.path, "size": f.size, f.algorithm: f.digest} for f in self.files],
            "versions": dict(self.versions),
            "extra": dict(self.extra),
        }
        if self.version is not None:  # absent otherwise, so keepbest 0.2 reads these manifests
            doc["version"] = self.version
        if self.files_under:
            doc["files_under"] = self.files_under
        # Absent when not recorded, so older keepbest (which ignores unknown fields) reads these manifests.
        for key, value in (("stall_s", self.stall), ("persist_s", self.persist), ("reused_bytes", self.reused_bytes)):
            if value is not None:
                doc[key] = value
        return json.dumps(doc, indent=1, sort_keys=True, allow_nan=False).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes, *, source: str) -> "Manifest":
        """Decodes and validates a manifest; ``source`` names it in errors."""
        try:
            doc = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CorruptCheckpointError(
                f"Cannot read manifest {source}: it is not valid JSON ({e}). "
                "The checkpoint cannot be trusted: load another one, or restore or delete it."
            ) from None
        return _Decoder(source).manifest(doc)


def is_safe_relative_path(path: str) -> bool:
    """True when ``path`` stays inside the directory it is relative to."""
    if not path or "\\" in path or "\x00" in path or path.startswith("/"):
        return False
    norm = posixpath.normpath(path)
    return norm == path and not norm.startswith("..") and norm != "."


def _encode_float(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-standard JSON constant {name}")


class _Decoder:
    """Type-checks a decoded JSON document field by field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, what: str, got: object) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"Invalid manifest {self.source}: {what}. The checkpoint cannot be trusted: "
            f"load another one, or restore or delete it. Received: {got!r:.200}"
        )

    def get(self, doc: Mapping[str, Any], key: str, types: tuple[type, ...], optional: bool = False) -> Any:
        if key not in doc:
            if optional:
                return None
            raise self.fail(f"missing field '{key}'", sorted(doc))
        value = doc[key]
        if value is None and optional:
            return None
        # bool is an int subclass; a manifest never stores booleans in numeric fields.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise self.fail(f"field '{key}' must be {'/'.join(t.__name__ for t in types)}", value)
        return value

    def manifest(self, doc: Any) -> Manifest:
        if not isinstance(doc, dict):
            raise self.fail("top level must be an object", type(doc).__name__)
        if doc.get("format") != FORMAT:
            raise self.fail(f"'format' must be '{FORMAT}'", doc.get("format"))
        version = self.get(doc, "format_version", (int,))
        if version > FORMAT_VERSION:
            raise CorruptCheckpointError(
                f"Cannot read manifest {self.source}: format_version {version} is newer than "
                f"this keepbest understands ({FORMAT_VERSION}). Upgrade keepbest. "
                f"Received: format_version={version}"
            )
        name = self.get(doc, "name", (str,))
        if not is_safe_relative_path(name) or "/" in name:
            raise self.fail("'name' must be a plain file or folder name", name)
        layout = self.get(doc, "layout", (str,))
        if layout not in LAYOUTS:
            raise self.fail(f"'layout' must be one of {LAYOUTS}", layout)
        return Manifest(
            name=name,
            layout=layout,
            format=self.get(doc, "payload", (str,)),
            series=self.get(doc, "series", (str,)),
            step=self.get(doc, "step", (int,), optional=True),
            epoch=self.get(doc, "epoch", (int,), optional=True),
            batch=self.get(doc, "batch", (int,), optional=True),
            metrics=self.metrics(self.get(doc, "metrics", (dict,))),
            monitor=self.monitor(self.get(doc, "monitor", (dict,), optional=True)),
            created=self.number(doc, "created"),
            files=tuple(self.file(f) for f in self.get(doc, "files", (list,))),
            versions=self.strings(self.get(doc, "versions", (dict,))),
            extra=self.get(doc, "extra", (dict,)),
            version=self.version(doc),
            files_under=self.files_under(doc),
            stall=self.seconds(doc, "stall_s"),
            persist=self.seconds(doc, "persist_s"),
            reused_bytes=self.count(doc, "reused_bytes"),
        )

    def seconds(self, doc: Mapping[str, Any], key: str) -> float | None:
        if self.get(doc, key, (int, float), optional=True) is None:
            return None
        value = self.number(doc, key)
        if not value >= 0 or value == math.inf:
            raise self.fail(f"'{key}' must be a finite number of seconds >= 0", doc[key])
        return value

    def count(self, doc: Mapping[str, Any], key: str) -> int | None:
        value = self.get(doc, key, (int,), optional=True)
        if value is not None and value < 0:
            raise self.fail(f"'{key}' must be a number >= 0", value)
        return value

    def files_under(self, doc: Mapping[str, Any]) -> str:
        value = self.get(doc, "files_under", (str,), optional=True)
        if value is not None and not is_safe_relative_path(value):
            raise self.fail("'files_under' escapes the checkpoint directory", value)
        return value or ""

    def version(self, doc: Mapping[str, Any]) -> int | None:
        value = self.get(doc, "version", (int,), optional=True)
        if value is not None and value < 0:
            raise self.fail("'version' must be a number >= 0", value)
        return value

    def metrics(self, raw: dict[str, Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, value in raw.items():
            if isinstance(value, str) and value in _NON_FINITE:
                out[key] = _NON_FINITE[value]
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = self.number(raw, key)
            else:
                raise self.fail(f"metric '{key}' must be a number", value)
        return out

    def number(self, doc: Mapping[str, Any], key: str) -> float:
        value = self.get(doc, key, (int, float))
        try:
            return float(value)
        except OverflowError:
            raise self.fail(f"field '{key}' is too large for a float", value) from None

    def monitor(self, raw: dict[str, Any] | None) -> MonitorRecord | None:
        if raw is None:
            return None
        mode = self.get(raw, "mode", (str,))
        if mode not in MODES:
            raise self.fail(f"monitor mode must be one of {MODES}", mode)
        return MonitorRecord(name=self.get(raw, "name", (str,)), mode=mode)

    def file(self, raw: Any) -> FileEntry:
        if not isinstance(raw, dict):
            raise self.fail("each entry of 'files' must be an object", raw)
        path = self.get(raw, "path", (str,))
        if not is_safe_relative_path(path):
            raise self.fail("a file path escapes the checkpoint directory", path)
        size = self.get(raw, "size", (int,))
        algorithms = [a for a in DIGESTS if a in raw]
        if len(algorithms) != 1:
            raise self.fail(f"file '{path}' needs exactly one digest ({' or '.join(DIGESTS)})", raw)
        digest = self.get(raw, algorithms[0], (str,))
        if size < 0 or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise self.fail(f"file '{path}' has an invalid size or {algorithms[0]}", raw)
        return FileEntry(path=path, size=size, digest=digest, algorithm=algorithms[0])

    def strings(self, raw: dict[str, Any]) -> dict[str, str]:
        if not all(isinstance(v, str) for v in raw.values()):
            raise self.fail("'versions' values must be strings", raw)
        return dict(raw)
