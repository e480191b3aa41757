"""What training and a sidecar evaluator tell each other through the checkpoint folder.

Three kinds of small records live in the checkpoint folder's store
(``<dir>/.keepbest/`` on a local folder), each written atomically:

- ``evaluators/<name>.json``: one evaluator's lease and progress. While its
  heartbeat is fresh (younger than its ``ttl``), training's retention keeps
  the checkpoint it is evaluating and, in ``every`` mode, every checkpoint it
  has not evaluated yet. It also records what was evaluated, so a restarted
  evaluator continues where it stopped.
- ``evaluations/<evaluator>/<checkpoint>.json``: the metrics of one
  evaluation (or why the checkpoint was quarantined), keyed by the
  checkpoint's commit id so a record never describes a newer checkpoint
  saved under the same name. ``keepbest ls`` shows them.
- ``ended/<hash of series>.json``: training of that series has ended; an
  evaluator that has nothing left to do stops.

A checkpoint is identified by its *commit id*: its name and the time its
manifest records, which changes whenever the name is saved again.

Example:
    >>> import tempfile
    >>> from keepbest import store
    >>> from keepbest.manifest import Manifest
    >>> root = store.open(tempfile.mkdtemp())
    >>> m = Manifest(name="ckpt-1", layout="dir", format="tensors", series="ckpt-{epoch}", created=5.0)
    >>> state = EvaluatorState(name="eval", mode="every", heartbeat=100.0)
    >>> _ = write_state(root, state)
    >>> sorted(held(root, [m], now=101.0))          # not evaluated yet: retention must keep it
    ['ckpt-1']
    >>> state.evaluated.append(commit_id(m)); _ = write_state(root, state)
    >>> sorted(held(root, [m], now=101.0))
    []
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

from keepbest.manifest import Manifest
from keepbest.store import ANY, Record, Store, liveness, owner_token

EVALUATORS = "evaluators"
EVALUATIONS = "evaluations"
ENDED = "ended"
MODES = ("every", "latest")


def commit_id(manifest: Manifest) -> str:
    """Names one committed version of a checkpoint (a re-save under the same name gets a new id)."""
    return f"{manifest.name}@{manifest.created!r}"


def _write_json(store: Store, key: str, doc: Mapping[str, Any], expect: str | None = ANY) -> str:
    return store.write_record(key, json.dumps(doc, indent=1, sort_keys=True).encode("utf-8"), expect=expect)


def _read_json(store: Store, record: Record | None) -> dict[str, Any] | None:
    """The JSON object in ``record``; None if it is gone; warns and returns None if it is damaged."""
    if record is None:
        return None
    where = store.record_where(record.key)
    try:
        doc = json.loads(record.data)
    except ValueError as e:
        warnings.warn(f"Ignoring {where}: it is not valid JSON ({e}). Delete it; the evaluator that wrote "
                      "it rewrites it when it runs again.", UserWarning, stacklevel=3)
        return None
    if not isinstance(doc, dict):
        warnings.warn(f"Ignoring {where}: expected a JSON object. Delete it. Received: {type(doc).__name__}",
                      UserWarning, stacklevel=3)
        return None
    return doc


# -- leases and progress ------------------------------------------------------------
@dataclass
class EvaluatorState:
    """One evaluator's lease and progress (``.keepbest/evaluators/<name>.json``).

    ``series`` limits which checkpoints it follows (None: all). ``evaluated``
    and ``quarantined`` hold commit ids; ``watermark`` is the commit time of
    the newest checkpoint it has evaluated (``latest`` mode never goes back
    before it). The lease holds while ``active`` and ``now - heartbeat < ttl``.
    """

    name: str
    mode: str = "every"
    series: list[str] | None = None
    owner: str = ""
    host: str = ""
    heartbeat: float = 0.0
    ttl: float = 120.0
    active: bool = True
    evaluating: str | None = None
    evaluated: list[str] = field(default_factory=list)
    quarantined: dict[str, str] = field(default_factory=dict)
    evaluations: int = 0
    watermark: float = float("-inf")

    def holds_lease(self, now: float) -> bool:
        return self.active and now - self.heartbeat < self.ttl

    def follows(self, manifest: Manifest) -> bool:
        return self.series is None or manifest.series in self.series

    def done(self, cid: str) -> bool:
        return cid in self.evaluated or cid in self.quarantined


def state_key(store: Store, name: str) -> str:
    return store.record_key(EVALUATORS, name)


def write_state(store: Store, state: EvaluatorState, expect: str | None = ANY) -> str:
    """Stores ``state``; with ``expect`` only if the stored one is still what was read (else RecordConflictError)."""
    doc = asdict(state)
    doc["watermark"] = None if state.watermark == float("-inf") else state.watermark
    return _write_json(store, state_key(store, state.name), doc, expect)


def _state_from(doc: dict[str, Any], path: str) -> EvaluatorState | None:
    try:
        watermark = doc.get("watermark")
        state = EvaluatorState(
            name=str(doc["name"]), mode=str(doc["mode"]),
            series=None if doc.get("series") is None else [str(s) for s in doc["series"]],
            owner=str(doc.get("owner", "")), host=str(doc.get("host", "")),
            heartbeat=float(doc["heartbeat"]), ttl=float(doc["ttl"]), active=bool(doc["active"]),
            evaluating=None if doc.get("evaluating") is None else str(doc["evaluating"]),
            evaluated=[str(c) for c in doc.get("evaluated", [])],
            quarantined={str(k): str(v) for k, v in dict(doc.get("quarantined", {})).items()},
            evaluations=int(doc.get("evaluations", 0)),
            watermark=float("-inf") if watermark is None else float(watermark),
        )
    except (KeyError, TypeError, ValueError) as e:
        warnings.warn(f"Ignoring evaluator state {path}: a field is missing or has the wrong type ({e!r}). "
                      "Delete it; the evaluator rewrites it when it runs again.", UserWarning, stacklevel=3)
        return None
    if state.mode not in MODES:
        warnings.warn(f"Ignoring evaluator state {path}: unknown mode. Expected one of {MODES}. "
                      f"Received: mode={state.mode!r}", UserWarning, stacklevel=3)
        return None
    return state


def read_state(store: Store, name: str) -> tuple[EvaluatorState | None, str | None]:
    """The stored state of evaluator ``name`` and its record's token (None, None when there is none)."""
    record = store.read_record(state_key(store, name))
    doc = _read_json(store, record)
    state = None if doc is None else _state_from(doc, store.record_where(state_key(store, name)))
    return state, None if record is None else record.token


def read_states(store: Store) -> list[EvaluatorState]:
    found = []
    for key in store.list_records(store.record_key(EVALUATORS)):
        doc = _read_json(store, store.read_record(key))
        state = None if doc is None else _state_from(doc, store.record_where(key))
        if state is not None:
            found.append(state)
    return found


def held(store: Store, manifests: Iterable[Manifest], now: float) -> set[str]:
    """Names among ``manifests`` that a live evaluator's lease keeps from retention."""
    states = [s for s in read_states(store) if s.holds_lease(now)]
    if not states:
        return set()
    keep = set()
    for m in manifests:
        cid = commit_id(m)
        for s in states:
            if s.follows(m) and (cid == s.evaluating or (s.mode == "every" and not s.done(cid))):
                keep.add(m.name)
    return keep


def this_host() -> str:
    return socket.gethostname()


def lease_owner() -> str:
    return owner_token()


def owner_is_alive(state: EvaluatorState) -> bool:
    """Whether the process that holds ``state``'s lease may still run (another host or PID namespace: yes)."""
    return liveness(state.owner) != "dead"


# -- evaluation records -------------------------------------------------------------
def write_record(store: Store, evaluator: str, manifest: Manifest, *,
                 metrics: Mapping[str, float] | None = None, quarantined: str | None = None,
                 seconds: float | None = None) -> None:
    """Records one evaluation (or a quarantine) beside the checkpoint it concerns."""
    _write_json(store, store.record_key(EVALUATIONS, evaluator, manifest.name), {
        "checkpoint": commit_id(manifest), "name": manifest.name, "evaluator": evaluator,
        "step": manifest.step, "epoch": manifest.epoch,
        "metrics": {k: _finite_or_text(float(v)) for k, v in (metrics or {}).items()},
        "quarantined": quarantined, "seconds": seconds, "evaluated_at": time.time(),
    })


def _finite_or_text(v: float) -> float | str:
    return v if v == v and abs(v) != float("inf") else str(v)


def _evaluations(store: Store, evaluator: str | None = None) -> list[tuple[str, dict[str, Any] | None]]:
    """``(key, document)`` of every evaluation record (of one evaluator)."""
    prefix = store.record_key(EVALUATIONS, evaluator) if evaluator else store.record_key(EVALUATIONS)
    return [(key, _read_json(store, store.read_record(key))) for key in store.list_records(prefix)]


def read_records(store: Store) -> dict[str, dict[str, dict[str, Any]]]:
    """``{commit id: {evaluator: record}}`` for every evaluation recorded in ``store``."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for _key, doc in _evaluations(store):
        if doc is not None and isinstance(doc.get("checkpoint"), str) and isinstance(doc.get("metrics"), dict) \
                and isinstance(doc.get("evaluator"), str):
            out.setdefault(doc["checkpoint"], {})[doc["evaluator"]] = doc
    return out


def prune_records(store: Store, live: Iterable[Manifest], evaluator: str | None = None) -> list[str]:
    """Removes records of checkpoints that are gone or were saved again; returns where they were."""
    live_ids = {commit_id(m) for m in live}
    removed = []
    for key, doc in _evaluations(store, evaluator):
        if doc is None or doc.get("checkpoint") not in live_ids:
            where = store.record_where(key)
            store.delete_record(key)
            removed.append(where)
    return removed


# -- end of training ----------------------------------------------------------------
def _ended_key(store: Store, series: str) -> str:
    return store.record_key(ENDED, hashlib.sha1(series.encode("utf-8")).hexdigest()[:16])


def mark_training_end(store: Store, series: str) -> None:
    """Tells evaluators that training of ``series`` has ended (its last save is committed)."""
    _write_json(store, _ended_key(store, series), {"series": series, "time": time.time()})


def clear_training_end(store: Store, series: str) -> None:
    """Training of ``series`` (re)starts: evaluators must wait for its checkpoints again."""
    store.delete_record(_ended_key(store, series))


def ended_series(store: Store) -> dict[str, float]:
    """``{series: time}`` of every series whose training has ended."""
    out = {}
    for key in store.list_records(store.record_key(ENDED)):
        doc = _read_json(store, store.read_record(key))
        if doc is not None and isinstance(doc.get("series"), str) and isinstance(doc.get("time"), (int, float)):
            out[doc["series"]] = float(doc["time"])
    return out
