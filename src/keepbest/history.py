"""An append-only history of each series: what was committed and deleted, and why; what publishers uploaded.

Retention deletes manifests, so what it threw away is recorded here, for a
report to show later. Events are appended with compare-and-swap to records
of :data:`CHUNK` versions each (``history/<series>/<n>``), so an append
rewrites a bounded record however long the run.

Example:
    >>> import tempfile
    >>> from keepbest import store
    >>> from keepbest.manifest import Manifest
    >>> folder = store.open(tempfile.mkdtemp())
    >>> m = Manifest(name="c1", layout="dir", format="t", series="s", version=0, created=1.0)
    >>> append(folder, "s", [committed(m), deleted(m, "retention: keep_last=1")])
    >>> [(e["event"], e["name"], e.get("reason")) for e in read(folder, "s")]
    [('committed', 'c1', None), ('deleted', 'c1', 'retention: keep_last=1')]
"""

from __future__ import annotations

import json
import time
import warnings
from typing import Any, Sequence

from keepbest.manifest import Manifest
from keepbest.store import Record, Store

FOLDER = "history"
FORMAT = "keepbest/history"
CHUNK = 500


def committed(m: Manifest) -> dict[str, Any]:
    return {"event": "committed", **_describe(m), "size": sum(f.size for f in m.files), "reused": m.reused_bytes,
            "stall": m.stall, "persist": m.persist, "metrics": {k: _json_float(v) for k, v in m.metrics.items()}}


def _json_float(value: float) -> float | str:
    return value if value == value and abs(value) != float("inf") else str(value)


def deleted(m: Manifest, reason: str) -> dict[str, Any]:
    return {"event": "deleted", **_describe(m), "reason": reason}


def published(m: Manifest, publisher: str, uploaded: bool) -> dict[str, Any]:
    """A publisher's upload of ``m`` succeeded (``uploaded``) or failed after its retries."""
    return {"event": "published", **_describe(m), "publisher": publisher, "uploaded": uploaded}


def _describe(m: Manifest) -> dict[str, Any]:
    value = m.monitor_value
    return {"name": m.name, "version": m.version, "step": m.step, "epoch": m.epoch, "batch": m.batch,
            "created": m.created, "time": time.time(),
            "monitor": None if m.monitor is None else {"name": m.monitor.name, "mode": m.monitor.mode,
                                                       "value": None if value is None else _json_float(value)}}


def append(store: Store, series: str, events: Sequence[dict[str, Any]]) -> None:
    """Appends ``events`` (from :func:`committed` / :func:`deleted`) to the history of ``series``."""
    chunks: dict[int, list[dict[str, Any]]] = {}
    for e in events:
        chunks.setdefault((e.get("version") or 0) // CHUNK, []).append(e)
    for number, group in sorted(chunks.items()):
        def add(current: Record | None, group: list[dict[str, Any]] = group) -> bytes:
            doc = _decode(current) if current is not None else None
            if doc is None:
                doc = {"format": FORMAT, "series": series, "events": []}
            doc["events"] += group
            return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")

        store.update_record(store.record_key(FOLDER, series, str(number)), add)


def _decode(record: Record) -> dict[str, Any] | None:
    try:
        doc = json.loads(record.data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("events"), list):
        warnings.warn(f"Ignoring the history record {record.key}: it is not a keepbest history. The checkpoints "
                      "are not affected; delete it to start the history afresh.", UserWarning, stacklevel=4)
        return None
    return doc


def read(store: Store, series: str) -> list[dict[str, Any]]:
    """Every recorded event of ``series``, oldest first."""
    keys = store.list_records(store.record_key(FOLDER, series))
    out: list[dict[str, Any]] = []
    for key in sorted(keys, key=lambda k: int(k.rsplit("/", 1)[-1]) if k.rsplit("/", 1)[-1].isdigit() else -1):
        record = store.read_record(key)
        doc = None if record is None else _decode(record)
        if doc is not None:
            out += [e for e in doc["events"] if isinstance(e, dict)]
    return sorted(out, key=lambda e: (e.get("time") or 0.0))


def forget(store: Store, series: str) -> None:
    for key in store.list_records(store.record_key(FOLDER, series)):
        store.delete_record(key)
