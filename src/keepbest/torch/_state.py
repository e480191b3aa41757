"""An ``app_state`` (names to modules, optimizers, schedulers, scalers, generators, dicts) as files, and back.

A checkpoint folder written by :class:`keepbest.torch.Checkpointer` holds
``app_state.json`` (the structure of every entry, its tensors replaced by
references), one ``<name>.safetensors`` per entry that has tensors, and
``rng.json`` (Python's, NumPy's and torch's generators; ``rng.p<r>.json`` for
process ``r`` of several). Nothing is pickled.

Restoring checks everything before it changes anything: missing and
unexpected entries and, for a module, missing and unexpected keys and size
mismatches, reported the way ``torch.nn.Module.load_state_dict`` does.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping

import numpy as np
import torch

from keepbest import codec, matching, rng
from keepbest.errors import CorruptCheckpointError, StateMismatchError
from keepbest.payload import process_file
from keepbest.store import Reader
from keepbest.torch import _host, _tree

STATE_FILE = "app_state.json"
RNG_FILE = "rng.json"
FORMAT = "torch"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_RESERVED = {"app_state", "rng"}
log = logging.getLogger("keepbest")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def kind(value: Any) -> str:
    """How an app_state entry is saved: by ``state_dict()``, as a generator's state, or as a plain dict."""
    if isinstance(value, torch.Generator):
        return "generator"
    if callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None)):
        return "state_dict"
    if isinstance(value, dict):
        return "dict"
    return "unknown"


def check_app_state(app_state: Any, verb: str) -> None:
    if not isinstance(app_state, Mapping) or not app_state:
        raise TypeError(
            f"Checkpointer.{verb} needs app_state: a non-empty dict of names to objects with state_dict() and "
            "load_state_dict() (modules, optimizers, LR schedulers, GradScaler), torch.Generators or plain dicts. "
            f"Example: {{'model': model, 'optimizer': optimizer}}. Received: app_state={app_state!r:.200}")
    for name, value in app_state.items():
        if not isinstance(name, str) or not _NAME.match(name) or name in _RESERVED:
            raise ValueError(
                f"Checkpointer.{verb}: app_state name {name!r} cannot name a file. Use letters, digits, '_', '.' "
                f"and '-' (not 'app_state' or 'rng'). Received: app_state keys {list(app_state)!r}")
        if kind(value) == "unknown":
            raise TypeError(
                f"Checkpointer.{verb}: app_state[{name!r}] is a {type(value).__qualname__}, which has no "
                "state_dict()/load_state_dict(). Pass a module, optimizer, scheduler, GradScaler, sampler with "
                f"state_dict, torch.Generator or a plain dict. Received: {value!r:.200}")


@dataclass
class Captured:
    """One save's content, before it becomes files."""

    tensors: dict[str, dict[str, torch.Tensor]]
    """Per safetensors file, tensor name -> tensor (views of the live state)."""
    document: dict[str, Any]
    """``app_state.json``."""
    groups: dict[str, dict[str, str]]
    """Per file, tensor name -> "trainable" / "frozen" / "buffer" (shards never mix them)."""


def capture(app_state: Mapping[str, Any]) -> Captured:
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    groups: dict[str, dict[str, str]] = {}
    entries: dict[str, Any] = {}
    for name, value in app_state.items():
        how = kind(value)
        state = value.get_state() if how == "generator" else value.state_dict() if how == "state_dict" else value
        found: dict[str, torch.Tensor] = {}
        tree = _tree.flatten(state, "", found, where=f"app_state[{name!r}]")
        fname = f"{name}.safetensors" if found else None
        if fname is not None:
            tensors[fname] = found
            if isinstance(value, torch.nn.Module):
                groups[fname] = _module_groups(value, found)
        entries[name] = {"kind": how, "type": f"{type(value).__module__}.{type(value).__qualname__}",
                         "file": fname, "tree": tree}
    return Captured(tensors, {"keepbest_torch": 1, "entries": entries}, groups)


def capture_values(values: Mapping[str, Any]) -> Captured:
    """Any mapping of names to tensors and JSON data (a Lightning checkpoint), one entry per top-level key."""
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    entries: dict[str, Any] = {}
    for i, (name, value) in enumerate(values.items()):
        if not isinstance(name, str):
            raise TypeError(f"Cannot save a checkpoint whose top-level key {name!r} is not a string. Use string keys. "
                            f"Received: keys {list(values)!r}")
        found: dict[str, torch.Tensor] = {}
        tree = _tree.flatten(value, "", found, where=f"checkpoint[{name!r}]")
        fname = f"{i:03d}-{_UNSAFE.sub('_', name)[:100]}.safetensors" if found else None
        if fname is not None:
            tensors[fname] = found
        entries[name] = {"kind": "value", "file": fname, "tree": tree}
    return Captured(tensors, {"keepbest_torch": 1, "entries": entries}, {})


def read_values(reader: Reader, views: Collection[str] = ()) -> dict[str, Any]:
    """What :func:`capture_values` saved: the tensors of the entries in ``views`` on copy-on-write views of the
    checkpoint's files (for a module to copy from; freed with the dict), the others copied into memory."""
    return {name: entry_state(reader, entry, private=True) if name in views else owned_copy(entry_state(reader, entry))
            for name, entry in read_document(reader).items()}


def _module_groups(module: torch.nn.Module, found: Mapping[str, torch.Tensor]) -> dict[str, str]:
    trainable = {n: p.requires_grad for n, p in module.named_parameters(remove_duplicate=False)}
    return {n: ("buffer" if n not in trainable else "trainable" if trainable[n] else "frozen") for n in found}


def rng_state() -> dict[str, Any]:
    """Python's, NumPy's and torch's global generators (CPU, and each CUDA device that was used)."""
    doc = rng.capture()
    doc["torch"] = _b64(torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        doc["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return doc


def _b64(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _bytes(text: Any, size: int | None) -> torch.Tensor | None:
    """A generator state from :func:`_b64`, or None when it is not one (of ``size`` bytes)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (TypeError, ValueError):
        return None
    if size is not None and len(raw) != size:
        return None
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


@dataclass
class Generators:
    """Saved generator states, checked and ready to set (:func:`checked_rng`)."""

    doc: dict[str, Any]
    cpu: torch.Tensor
    cuda: list[torch.Tensor]

    def restore(self) -> None:
        rng.restore(self.doc)
        torch.set_rng_state(self.cpu)
        if self.cuda and torch.cuda.is_available():
            devices = torch.cuda.device_count()
            if len(self.cuda) > devices:
                log.warning("keepbest: the checkpoint holds the generators of %d CUDA devices, this process sees "
                            "%d; the first %d are restored.", len(self.cuda), devices, devices)
            for i, state in enumerate(self.cuda[:devices]):
                torch.cuda.set_rng_state(state, i)


def checked_rng(doc: Any, where: str) -> Generators:
    """The generator states of a ``rng.json``, checked before anything is set."""
    cpu = _bytes(doc.get("torch"), torch.get_rng_state().numel()) if isinstance(doc, dict) else None
    found = [_bytes(s, None) for s in doc.get("cuda") or []] if cpu is not None else []
    cuda = [s for s in found if s is not None]
    if cpu is None or not rng.is_valid(doc) or len(cuda) != len(found):
        raise CorruptCheckpointError(f"Cannot restore the random generators from {where}: the file is not what "
                                     "keepbest writes. Restore with rng=False to skip them. Received: a malformed "
                                     f"document ({str(doc)[:80]}...)")
    return Generators(doc, cpu, cuda)


def check_optimizer(optimizer: torch.optim.Optimizer, saved: Any, name: str, where: str) -> None:
    """``Optimizer.load_state_dict``'s checks of the parameter groups, made before anything is changed."""
    groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    ours = optimizer.param_groups
    if not isinstance(groups, list) or len(groups) != len(ours) or any(
            not isinstance(g, Mapping) or len(g.get("params", ())) != len(o["params"]) for g, o in zip(groups, ours)):
        sizes = [len(g.get("params", ())) if isinstance(g, Mapping) else None for g in groups or []]
        raise StateMismatchError(
            f"Error(s) in loading the optimizer state of app_state[{name!r}] from {where}: the saved parameter groups "
            f"do not match the optimizer's (parameters per group: saved {sizes}, optimizer "
            f"{[len(o['params']) for o in ours]}). Build the optimizer over the same parameters as at the save. "
            f"Received: {len(groups or [])} saved group(s)")


# -- reading back ---------------------------------------------------------------------------------------

def read_document(reader: Reader) -> dict[str, Any]:
    if not reader.has(STATE_FILE):
        raise StateMismatchError(
            f"Checkpoint {reader.where()} was not written by keepbest.torch (it has no {STATE_FILE}; its format is "
            f"'{reader.manifest.format}'). Restore it with the adapter that wrote it. "
            f"Received: files={[f.path for f in reader.manifest.files]}")
    try:
        doc = json.loads(reader.read(STATE_FILE))
        entries = doc["entries"]
        assert isinstance(entries, dict)
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise CorruptCheckpointError(f"Cannot read {reader.where(STATE_FILE)}: {e}. It is not what keepbest wrote. "
                                     "Restore another checkpoint. Received: a malformed document") from None
    return entries


def read_rng(reader: Reader, rank: int) -> Any | None:
    fname = process_file(RNG_FILE, rank)
    if not reader.has(fname):
        return None
    return json.loads(reader.read(fname))


def entry_state(reader: Reader, entry: Mapping[str, Any], private: bool = False) -> Any:
    """One entry's state dict, its tensors viewing the checkpoint's memory-mapped files: read-only, or with
    ``private`` copy-on-write (writable; an optimizer may keep them, and its steps never reach the files)."""
    def buffer(rel: str) -> Any:
        return reader.buffer(rel, private=private)

    arrays = codec.load(buffer, entry["file"], reader.where) if entry.get("file") else {}
    tensors = {k: _host.tensor(a) for k, a in arrays.items()}
    missing = _tree.tensor_names(entry["tree"]) - set(tensors)
    if missing:
        raise CorruptCheckpointError(f"Cannot read {reader.where(entry.get('file') or STATE_FILE)}: tensors "
                                     f"{sorted(missing)[:5]} are referenced but not stored. Restore another "
                                     "checkpoint. Received: a file without them")
    return _tree.unflatten(entry["tree"], tensors)


def check_entries(app_state: Mapping[str, Any], entries: Mapping[str, Any], where: str, strict: bool) -> list[str]:
    """Raises for entries that cannot be restored; returns what ``strict=False`` leaves as it is."""
    missing = [n for n in app_state if n not in entries]
    unexpected = [n for n in entries if n not in app_state]
    wrong = [f"{n}: saved as {entries[n]['kind']} ({entries[n].get('type')}), given a {type(app_state[n]).__qualname__}"
             for n in app_state if n in entries and entries[n]["kind"] != kind(app_state[n])]
    if wrong or (strict and (missing or unexpected)):
        raise StateMismatchError(
            f"Error(s) in restoring app_state from {where}: Missing key(s) in checkpoint: {matching.names(missing)}. "
            f"Unexpected key(s) in checkpoint: {matching.names(unexpected)}."
            + (f" Different kinds: {'; '.join(wrong)}." if wrong else "")
            + " Pass the same app_state names as at the save, or strict=False to restore only the common ones. "
            f"Received: app_state keys {list(app_state)}, saved {list(entries)}")
    return [f"{n} (not in the checkpoint)" for n in missing]


def check_module(module: torch.nn.Module, saved: Mapping[str, Any], name: str, where: str, strict: bool) -> None:
    """``load_state_dict``'s checks, made before anything is copied (so a failure changes nothing)."""
    own = module.state_dict()
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    sizes = [f'size mismatch for {k}: copying a param with shape {tuple(saved[k].shape)} from checkpoint, the shape '
             f'in current model is {tuple(own[k].shape)}' for k in own
             if k in saved and isinstance(own[k], torch.Tensor) and tuple(own[k].shape) != tuple(saved[k].shape)]
    if sizes or (strict and (missing or unexpected)):
        raise StateMismatchError(
            f"Error(s) in loading state_dict for {type(module).__name__} (app_state[{name!r}]) from {where}: "
            f"Missing key(s) in state_dict: {matching.names(missing)}. "
            f"Unexpected key(s) in state_dict: {matching.names(unexpected)}. "
            + ("; ".join(sizes[:20]) + ". " if sizes else "")
            + "Build the same model as the one saved, or pass strict=False to skip missing and unexpected keys. "
            f"Received: {len(saved)} saved tensors for {len(own)} in the model")


def owned_copy(state: Any) -> Any:
    """``state`` with its tensors copied out of the checkpoint's mapped files into the process's own memory:
    an optimizer keeps what it is given, and a mapping would pin the files (descriptors, disk space after
    retention deletes them, NFS's silly renames) for the rest of the run. A tensor that appears twice is
    copied once and stays shared."""
    found: dict[int, torch.Tensor] = {}
    _collect(state, found)
    copies = dict(zip(found, _host.owned(list(found.values()))))
    return _replaced(state, copies)


def _collect(state: Any, out: dict[int, torch.Tensor]) -> None:
    if isinstance(state, torch.Tensor):
        out[id(state)] = state
    elif isinstance(state, (list, tuple)):
        for v in state:
            _collect(v, out)
    elif isinstance(state, dict):
        for v in state.values():
            _collect(v, out)


def _replaced(state: Any, copies: Mapping[int, torch.Tensor]) -> Any:
    return map_tensors(state, lambda t: copies[id(t)], np.ndarray.copy)


def map_tensors(state: Any, fn: Callable[[torch.Tensor], Any],
                arrays: Callable[[np.ndarray], Any] | None = None) -> Any:
    """``state`` rebuilt with ``fn(tensor)`` for each tensor (and ``arrays(array)`` for each NumPy array), its
    containers kept: lists, tuples, dicts of their own type and a module's ``_metadata``."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, np.ndarray):
        return arrays(state) if arrays is not None else state
    if isinstance(state, list):
        return [map_tensors(v, fn, arrays) for v in state]
    if isinstance(state, tuple):
        return tuple(map_tensors(v, fn, arrays) for v in state)
    if isinstance(state, dict):
        out = type(state)((k, map_tensors(v, fn, arrays)) for k, v in state.items())
        if hasattr(state, "_metadata"):
            out._metadata = state._metadata  # type: ignore[attr-defined]
        return out
    return state
