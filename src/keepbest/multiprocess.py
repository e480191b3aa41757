"""One checkpoint from many processes: the save protocol over a :class:`~keepbest.distributed.Channel`.

Every process calls :func:`commit_together` with its own tensors (the same
name and manifest fields on every process):

1. all processes exchange what they hold (names, shapes, dtypes, bytes) and
   derive the same ownership (:func:`keepbest.payload.owners`): a replicated
   tensor is written by one process, a per-process shard by its holder;
2. the committer (process 0) stages the checkpoint and sends its handle;
   every process writes the tensors it owns into shard files of its own,
   in that same staged entry (a shared folder, or the bucket prefix);
3. the committer gathers every file's size and digest, writes each
   safetensors file as an index of all shards, reserves the version and
   commits the manifest; then it tells the others what it committed.

A process that fails to write reports its error and nothing is committed;
a process that died or hangs is a
:class:`~keepbest.errors.CoordinationError` on the others within the
coordinator's timeout. The committer then discards what was staged (the
others' files too), so the previous checkpoints stay as they were, and the
channel refuses further saves: the processes are out of step.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any, Callable, Sequence

from keepbest.distributed import Channel
from keepbest.errors import CoordinationError
from keepbest.manifest import FileEntry, Manifest
from keepbest.payload import TensorPayload, owners
from keepbest.store import Staged, Store


def commit_together(channel: Channel, store: Store, manifest: Manifest, payload: TensorPayload, *,
                    listing: Callable[[], list[Manifest]], reserve: Callable[[list[Manifest]], int],
                    base: Callable[[list[Manifest]], Manifest | None],
                    ownership: dict[tuple[str, str], int]) -> tuple[Manifest, list[Manifest]]:
    """Saves ``payload`` (this process's tensors) as checkpoint ``manifest.name`` together with the other
    processes; returns the committed manifest and, on the committer, the series as listed before.

    ``ownership`` (``(file, name) -> process``) is the previous save's: tensors keep their writer while
    it holds them. It is replaced by this save's when the save commits, and emptied when it fails (the
    next snapshot then copies everything).
    """
    about = f"checkpoint {manifest.name}" + (f" (step {manifest.step})" if manifest.step is not None else "")
    previous = dict(ownership)
    ownership.clear()
    committed = _commit(channel, store, manifest, payload, about, listing, reserve, base, previous, ownership)
    return committed


def _commit(channel: Channel, store: Store, manifest: Manifest, payload: TensorPayload, about: str,
            listing: Callable[[], list[Manifest]], reserve: Callable[[list[Manifest]], int],
            base: Callable[[list[Manifest]], Manifest | None], previous: dict[tuple[str, str], int],
            ownership: dict[tuple[str, str], int]) -> tuple[Manifest, list[Manifest]]:
    failure: BaseException | None = None
    try:
        mine: dict[str, Any] = {"held": payload.held(), "pieces": payload.pieces or {},
                                "metadata": payload.metadata or {}, "name": manifest.name}
    except Exception as e:  # (a dtype safetensors cannot store): every process hears it at the first exchange
        failure, mine = e, {"error": _describe(e), "name": manifest.name}
    held = channel.all_gather("held", mine, about=about)
    failed = [(rank, h["error"]) for rank, h in enumerate(held) if "error" in h]
    if failure is not None:
        raise failure
    if failed:
        raise CoordinationError(f"Cannot save {about}: process {failed[0][0]} cannot save its part: {failed[0][1]}. "
                                "Nothing was written. Fix the cause and save again. "
                                f"Received: {len(failed)} process(es) failed")
    names = {h["name"] for h in held}
    if len(names) > 1:
        raise CoordinationError(f"Cannot save {about}: the processes save under different names ({sorted(names)}), "
                                "so they are not at the same save. Save with the same step/name on every process. "
                                f"Received: name={manifest.name!r} on process {channel.rank}")
    assignment = owners([h["held"] for h in held], previous)
    owned = assignment[channel.rank]
    decided = {(fname, name): rank for rank, files in enumerate(assignment) for fname, names in files.items()
               for name in names}
    pieces: dict[str, dict[str, Any]] = {}
    metadata: dict[str, dict[str, str]] = {}  # per file, the first process's that holds it
    for h in held:
        for fname, shapes in h["pieces"].items():
            pieces.setdefault(fname, {}).update(shapes)
        for fname in h["held"]:
            metadata.setdefault(fname, dict(h["metadata"].get(fname) or {}))

    before: list[Manifest] = []
    staged: Staged | None = None
    if channel.committer:
        try:
            before = listing()
            staged = store.stage(manifest.name, "dir")
            reuse = base(before)
            message = {"handle": staged.handle(), "base": None if reuse is None else reuse.to_json().decode("utf-8")}
        except BaseException as e:
            if staged is not None:
                store.discard(staged)
            channel.broadcast("staged", {"error": _describe(e)}, about=about)
            raise
        channel.broadcast("staged", message, about=about)
    else:
        got = channel.broadcast("staged", None, about=about)
        if "error" in got:
            raise CoordinationError(f"Cannot save {about}: process 0 could not stage it: {got['error']}. Nothing was "
                                    "written; the previous checkpoints are intact. Fix the cause and save again. "
                                    f"Received: error on process 0")
        reuse = None if got["base"] is None else Manifest.from_json(got["base"].encode("utf-8"),
                                                                   source=f"process 0's base of {about}")

    try:
        if not channel.committer:  # (a folder this process cannot see is its failure, reported to process 0)
            staged = store.join(got["handle"])
        assert staged is not None
        entries, shards = replace(payload, base=reuse).write_part(staged, channel.rank, owned)
        report: dict[str, Any] = {"entries": [asdict(e) for e in entries], "shards": shards}
    except Exception as e:  # reported to the committer, so that nothing is committed; raised below
        failure, report = e, {"error": _describe(e)}
    try:
        reports = channel.gather("written", report, about=about)
    except BaseException:
        if staged is not None and channel.committer:
            store.discard(staged)
        raise
    if failure is not None and channel.committer:
        assert staged is not None
        store.discard(staged)
        channel.broadcast("committed", {"error": f"the committer failed to write its part: {_describe(failure)}."},
                          about=about)
        raise failure
    if not channel.committer:
        outcome = channel.broadcast("committed", None, about=about)  # every process takes part in every message
        if failure is not None:
            raise failure
        if "error" in outcome:
            raise CoordinationError(f"Cannot save {about}: {outcome['error']} Nothing was committed; the previous "
                                    "checkpoints are intact. Received: the committer's report")
        ownership.update(decided)
        return Manifest.from_json(outcome["manifest"].encode("utf-8"), source=f"process 0's commit of {about}"), []
    assert reports is not None and staged is not None
    committed = _commit_gathered(channel, store, staged, manifest, replace(payload, base=reuse), reports, pieces,
                                 metadata, before, reserve, about)
    ownership.update(decided)
    return committed, before


def _commit_gathered(channel: Channel, store: Store, staged: Staged, manifest: Manifest, payload: TensorPayload,
                     reports: Sequence[dict[str, Any]], pieces: dict[str, dict[str, Any]],
                     metadata: dict[str, dict[str, str]], before: list[Manifest],
                     reserve: Callable[[list[Manifest]], int], about: str) -> Manifest:
    committing = False
    try:
        failed = [(rank, r["error"]) for rank, r in enumerate(reports) if "error" in r]
        if failed:
            rank, error = failed[0]
            raise CoordinationError(
                f"Process {rank} failed to write its part of {about}: {error}. Nothing was committed; the previous "
                f"checkpoints are intact. Fix the cause and save again. Received: {len(failed)} process(es) failed")
        entries = [FileEntry(**e) for r in reports for e in r["entries"]]
        shards: dict[str, list[str]] = {}
        for r in reports:
            for fname, names in r["shards"].items():
                shards.setdefault(fname, []).extend(names)
        entries += payload.write_index(staged, metadata, shards, pieces)
        files = tuple(sorted(entries, key=lambda e: e.path))
        version = reserve(before)
        committing = True  # a failed commit discards what was staged itself
        committed = store.commit(staged, replace(manifest, version=version).with_files(files))
    except BaseException as e:
        if not committing:
            store.discard(staged)
        channel.broadcast("committed", {"error": f"the committer could not commit it: {_describe(e)}."}, about=about)
        raise
    channel.broadcast("committed", {"manifest": committed.to_json().decode("utf-8")}, about=about)
    return committed


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
