"""What training and a sidecar evaluator tell each other through the checkpoint folder.

Three kinds of small JSON files live under ``<dir>/.keepbest/``, each written
atomically (temp sibling, fsync, rename):

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
    >>> from keepbest.manifest import Manifest
    >>> root = tempfile.mkdtemp()
    >>> m = Manifest(name="ckpt-1", layout="dir", format="tensors", series="ckpt-{epoch}", created=5.0)
    >>> state = EvaluatorState(name="eval", mode="every", heartbeat=100.0)
    >>> write_state(root, state)
    >>> sorted(held(root, [m], now=101.0))          # not evaluated yet: retention must keep it
    ['ckpt-1']
    >>> state.evaluated.append(commit_id(m)); write_state(root, state)
    >>> sorted(held(root, [m], now=101.0))
    []
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from keepbest import _fs
from keepbest.manifest import Manifest
from keepbest.storage import INDEX_DIR, TMP_PREFIX

EVALUATORS = "evaluators"
EVALUATIONS = "evaluations"
ENDED = "ended"
MODES = ("every", "latest")


def commit_id(manifest: Manifest) -> str:
    """Names one committed version of a checkpoint (a re-save under the same name gets a new id)."""
    return f"{manifest.name}@{manifest.created!r}"


def _index(root: str | os.PathLike[str], *parts: str) -> Path:
    return Path(root, INDEX_DIR, *parts)


def _write_json(path: Path, doc: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _fs.write_durably(path, json.dumps(doc, indent=1, sort_keys=True).encode("utf-8"))


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None if it is gone; warns and returns None if it is damaged."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as e:
        warnings.warn(f"Ignoring {path}: it is not valid JSON ({e}). Delete it; the evaluator that wrote "
                      "it rewrites it when it runs again.", UserWarning, stacklevel=3)
        return None
    if not isinstance(doc, dict):
        warnings.warn(f"Ignoring {path}: expected a JSON object. Delete it. Received: {type(doc).__name__}",
                      UserWarning, stacklevel=3)
        return None
    return doc


def _files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix == ".json" and not p.name.startswith(TMP_PREFIX))


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


def state_path(root: str | os.PathLike[str], name: str) -> Path:
    return _index(root, EVALUATORS, f"{name}.json")


def write_state(root: str | os.PathLike[str], state: EvaluatorState) -> None:
    doc = asdict(state)
    doc["watermark"] = None if state.watermark == float("-inf") else state.watermark
    _write_json(state_path(root, state.name), doc)


def _state_from(doc: dict[str, Any], path: Path) -> EvaluatorState | None:
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


def read_state(root: str | os.PathLike[str], name: str) -> EvaluatorState | None:
    path = state_path(root, name)
    doc = _read_json(path)
    return None if doc is None else _state_from(doc, path)


def read_states(root: str | os.PathLike[str]) -> list[EvaluatorState]:
    found = []
    for path in _files(_index(root, EVALUATORS)):
        doc = _read_json(path)
        state = None if doc is None else _state_from(doc, path)
        if state is not None:
            found.append(state)
    return found


def held(root: str | os.PathLike[str], manifests: Iterable[Manifest], now: float) -> set[str]:
    """Names among ``manifests`` that a live evaluator's lease keeps from retention."""
    states = [s for s in read_states(root) if s.holds_lease(now)]
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
    return _fs.owner_token()


def owner_is_alive(state: EvaluatorState) -> bool:
    """Whether the process that holds ``state``'s lease still runs (unknowable on another host: True)."""
    return state.host != this_host() or _fs.owner_is_alive(state.owner or "0")


# -- evaluation records -------------------------------------------------------------
def write_record(root: str | os.PathLike[str], evaluator: str, manifest: Manifest, *,
                 metrics: Mapping[str, float] | None = None, quarantined: str | None = None,
                 seconds: float | None = None) -> None:
    """Records one evaluation (or a quarantine) beside the checkpoint it concerns."""
    _write_json(_index(root, EVALUATIONS, evaluator, f"{manifest.name}.json"), {
        "checkpoint": commit_id(manifest), "name": manifest.name, "evaluator": evaluator,
        "step": manifest.step, "epoch": manifest.epoch,
        "metrics": {k: _finite_or_text(float(v)) for k, v in (metrics or {}).items()},
        "quarantined": quarantined, "seconds": seconds, "evaluated_at": time.time(),
    })


def _finite_or_text(v: float) -> float | str:
    return v if v == v and abs(v) != float("inf") else str(v)


def read_records(root: str | os.PathLike[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{commit id: {evaluator: record}}`` for every evaluation recorded in ``root``."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    base = _index(root, EVALUATIONS)
    if not base.is_dir():
        return out
    for folder in sorted(p for p in base.iterdir() if p.is_dir()):
        for path in _files(folder):
            doc = _read_json(path)
            if doc is not None and isinstance(doc.get("checkpoint"), str) and isinstance(doc.get("metrics"), dict):
                out.setdefault(doc["checkpoint"], {})[folder.name] = doc
    return out


def prune_records(root: str | os.PathLike[str], live: Iterable[Manifest], evaluator: str | None = None) -> list[Path]:
    """Removes records of checkpoints that are gone or were saved again; returns what was removed."""
    live_ids = {m.name: commit_id(m) for m in live}
    base = _index(root, EVALUATIONS)
    folders = [base / evaluator] if evaluator else (sorted(p for p in base.iterdir() if p.is_dir())
                                                    if base.is_dir() else [])
    removed = []
    for folder in folders:
        for path in _files(folder):
            doc = _read_json(path)
            cid = None if doc is None else doc.get("checkpoint")
            if live_ids.get(path.name[: -len(".json")]) != cid:
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


# -- end of training ----------------------------------------------------------------
def _ended_path(root: str | os.PathLike[str], series: str) -> Path:
    return _index(root, ENDED, hashlib.sha1(series.encode("utf-8")).hexdigest()[:16] + ".json")


def mark_training_end(root: str | os.PathLike[str], series: str) -> None:
    """Tells evaluators that training of ``series`` has ended (its last save is committed)."""
    _write_json(_ended_path(root, series), {"series": series, "time": time.time()})


def clear_training_end(root: str | os.PathLike[str], series: str) -> None:
    """Training of ``series`` (re)starts: evaluators must wait for its checkpoints again."""
    path = _ended_path(root, series)
    if path.exists():
        path.unlink()
        _fs.fsync_dir(path.parent)


def ended_series(root: str | os.PathLike[str]) -> dict[str, float]:
    """``{series: time}`` of every series whose training has ended."""
    out = {}
    for path in _files(_index(root, ENDED)):
        doc = _read_json(path)
        if doc is not None and isinstance(doc.get("series"), str) and isinstance(doc.get("time"), (int, float)):
            out[doc["series"]] = float(doc["time"])
    return out
