"""The storage contract suite: what every backend of ``keepbest.store`` must do.

A backend's test module subclasses :class:`StoreContract` and provides two
fixtures (fsspec's ``tests/abstract`` is the model):

- ``store``: a fresh, empty store (its folder or prefix need not exist yet);
- ``tamper``: ``tamper(store, manifest, rel, how)`` changes a committed file
  behind keepbest's back, as a user or a failing disk would
  (``how`` is ``"flip"``, ``"truncate"`` or ``"delete"``), and returns where
  that file is (its path or URL, as keepbest's messages name it).
- ``put_foreign``: ``put_foreign(store, name, data)`` writes a top-level file
  that keepbest did not write (a model saved by Keras itself).

Only the contract's operations are used here; what a backend does on its
own (crash images of a local folder, conditional PUTs) is tested beside it.
"""

from __future__ import annotations

import json
import re
import threading

import pytest

from keepbest import store as stores
from keepbest.errors import CheckpointNotFoundError, CorruptCheckpointError, StorageError
from keepbest.manifest import FileEntry, Manifest
from keepbest.store import ANY, RecordConflictError

V1 = {"state.bin": b"version one", "sub/extra.json": b'{"v": 1}'}
V2 = {"state.bin": b"version two, longer", "sub/extra.json": b'{"v": 2}'}
HELLO_BLAKE3 = "86f2d80abe9c3f7b4a1a57a8d1130fa8dc08c81604833ce1212dc039b010d9e4"  # of b"12345"
EMPTY_BLAKE3 = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"


def manifest(name, layout, **fields):
    return Manifest(name=name, layout=layout, format="bytes", series="s", **fields)


def commit_file(store, name, data, **fields):
    staged = store.stage(name, "file")
    with open(staged.local_path(), "wb") as f:  # what a framework's own writer does with the local path
        f.write(data)
    return store.commit(staged, manifest(name, "file", **fields))


def commit_dir(store, name, files, **fields):
    staged = store.stage(name, "dir")
    entries = tuple(staged.write(rel, data) for rel, data in files.items())
    return store.commit(staged, manifest(name, "dir", **fields).with_files(tuple(sorted(entries, key=lambda e: e.path))))


def commit(store, layout, name, version, **fields):
    if layout == "file":
        return commit_file(store, name, version["state.bin"], **fields)
    return commit_dir(store, name, version, **fields)


def contents(store, m):
    """The payload bytes of committed ``m`` in the shape ``commit`` takes them."""
    reader = store.reader(m)
    if m.layout == "file":
        return {"state.bin": reader.read(m.name)}
    return {f.path: reader.read(f.path) for f in m.files}


def expected(layout, version):
    return {"state.bin": version["state.bin"]} if layout == "file" else version


def listed(store):
    listing = store.list()
    assert listing.damaged == []
    return listing.manifests


LAYOUTS = pytest.mark.parametrize("layout", ["file", "dir"])


class StoreContract:
    """Inherited by each backend's test class."""

    def assert_only_version(self, store, layout, name, version):
        (m,) = listed(store)
        assert m.name == name
        store.verify(m)
        assert contents(store, m) == expected(layout, version)

    # -- commit and list ------------------------------------------------------------------
    def test_commit_file_entry_lists_it_with_size_and_blake3(self, store):
        commit_file(store, "model.keras", b"12345")
        (m,) = listed(store)
        assert (m.name, m.layout, m.files) == ("model.keras", "file", (FileEntry("model.keras", 5, HELLO_BLAKE3),))

    def test_commit_dir_entry_lists_every_file_with_size_and_blake3(self, store):
        commit_dir(store, "ckpt-1", {"a.bin": b"12345", "sub/b.bin": b""})
        (m,) = listed(store)
        assert (m.name, m.layout, m.files) == ("ckpt-1", "dir", (
            FileEntry("a.bin", 5, HELLO_BLAKE3), FileEntry("sub/b.bin", 0, EMPTY_BLAKE3)))

    def test_write_under_its_own_name_fills_a_file_entry(self, store):
        staged = store.stage("model.safetensors", "file")
        entry = staged.write("model.safetensors", [memoryview(b"123"), memoryview(b"45")])
        committed = store.commit(staged, manifest("model.safetensors", "file").with_files((entry,)))
        assert committed.files == (FileEntry("model.safetensors", 5, HELLO_BLAKE3),)
        assert contents(store, committed) == {"state.bin": b"12345"}

    def test_a_file_entry_refuses_a_write_under_another_name(self, store):
        staged = store.stage("model.keras", "file")
        with pytest.raises(ValueError, match="has no files inside"):
            staged.write("other.bin", b"12345")
        store.discard(staged)

    def test_commit_hashes_the_files_when_the_manifest_lists_none(self, store):
        staged = store.stage("ckpt-1", "dir")
        staged.write("a.bin", b"12345")
        committed = store.commit(staged, manifest("ckpt-1", "dir"))
        assert committed.files == (FileEntry("a.bin", 5, HELLO_BLAKE3),)

    def test_commit_returns_the_manifest_that_is_listed(self, store):
        committed = commit_dir(store, "ckpt-1", V1, step=3, metrics={"loss": 0.5})
        assert listed(store) == [committed]

    def test_staged_entries_are_not_listed_before_commit(self, store):
        staged = store.stage("ckpt-1", "dir")
        staged.write("a.bin", b"data")
        with open(store.stage("model.keras", "file").local_path(), "wb") as f:
            f.write(b"data")
        assert listed(store) == []

    # -- one checkpoint written by several processes (keepbest.multiprocess) --------------------------------
    @pytest.mark.parametrize("again", [False, True], ids=["new", "saved-again"])
    def test_files_written_into_a_joined_entry_commit_with_the_stagers(self, store, again):
        if again:
            commit_dir(store, "ckpt-1", V1)
        staged = store.stage("ckpt-1", "dir")
        other = stores.open(store.url).join(json.loads(json.dumps(staged.handle())))  # as another process does
        entries = (staged.write("a.bin", b"from 0"), other.write("b.bin", b"from 1"))
        store.commit(staged, manifest("ckpt-1", "dir").with_files(entries))
        (m,) = listed(store)
        assert contents(store, m) == {"a.bin": b"from 0", "b.bin": b"from 1"}
        store.verify(m)

    def test_discarding_a_joined_entry_removes_the_other_processes_files_too(self, store):
        commit_dir(store, "ckpt-0", V1)
        staged = store.stage("ckpt-1", "dir")
        other = stores.open(store.url).join(staged.handle())
        staged.write("a.bin", b"from 0")
        other.write("b.bin", b"from 1")
        store.discard(staged)
        assert [m.name for m in listed(store)] == ["ckpt-0"]
        assert store.orphans().dead == [] and store.recover().changed is False

    def test_a_joined_entry_refuses_to_write_once_its_stager_gave_up(self, store):
        staged = store.stage("ckpt-1", "dir")
        other = stores.open(store.url).join(staged.handle())
        store.discard(staged)
        with pytest.raises(StorageError, match="gave up this save"):
            other.write("b.bin", b"late")
        assert listed(store) == [] and store.orphans().dead == []

    def test_join_refuses_a_handle_it_did_not_give_out(self, store):
        with pytest.raises(ValueError, match="Cannot write into"):
            store.join({"name": "ckpt-1", "layout": "file", "path": "/elsewhere", "lock": ["x", "y"]})

    def test_discarded_stage_lists_nothing(self, store):
        staged = store.stage("ckpt-1", "dir")
        staged.write("a.bin", b"data")
        store.discard(staged)
        assert listed(store) == [] and store.orphans().dead == []

    def test_list_of_a_store_that_does_not_exist_yet_is_empty(self, store):
        assert not store.exists() and listed(store) == [] and store.orphans().dead == []

    @LAYOUTS
    def test_commit_replaces_an_existing_entry(self, store, layout):
        commit(store, layout, "ckpt", V1)
        commit(store, layout, "ckpt", V2)
        self.assert_only_version(store, layout, "ckpt", V2)

    @LAYOUTS
    def test_a_name_of_255_bytes_commits_and_lists(self, store, layout):
        name = "n" * 249 + ".keras"
        commit(store, layout, name, V1)
        self.assert_only_version(store, layout, name, V1)

    @pytest.mark.parametrize("name", ["", "a/b", "..", ".keepbest-tmp-x", "x" * 256])
    def test_a_name_that_cannot_be_a_file_name_is_refused_before_staging(self, store, name):
        with pytest.raises(ValueError, match=r"Checkpoint name .* Received: name="):
            store.stage(name, "dir")

    # -- reading ----------------------------------------------------------------------------
    @LAYOUTS
    def test_reader_reads_whole_files_and_ranges(self, store, layout):
        m = commit(store, layout, "ckpt", V1)
        reader = store.reader(m)
        rel = "state.bin" if layout == "dir" else m.name
        assert reader.read(rel) == V1["state.bin"] and reader.read_range(rel, 8, 3) == b"one"
        assert bytes(reader.buffer(rel)) == V1["state.bin"] and reader.has(rel) and not reader.has("nope")
        assert "ckpt" in reader.where() and rel in reader.where(rel)

    @LAYOUTS
    def test_a_private_buffer_is_writable_and_its_writes_never_reach_the_checkpoint(self, store, layout):
        m = commit(store, layout, "ckpt", V1)
        rel = "state.bin" if layout == "dir" else m.name
        private = store.reader(m).buffer(rel, private=True)
        view = memoryview(private)
        assert not view.readonly
        view[0:3] = b"XYZ"
        assert bytes(private)[:3] == b"XYZ"
        assert bytes(store.reader(m).buffer(rel)) == V1["state.bin"]
        store.verify(m)
        with pytest.raises(TypeError):
            memoryview(store.reader(m).buffer(rel))[0:1] = b"X"  # the plain buffer stays read-only

    @LAYOUTS
    def test_reader_local_path_holds_the_committed_bytes(self, store, layout):
        m = commit(store, layout, "ckpt", V1)
        local = store.reader(m).local_path()
        path = local if layout == "file" else local / "state.bin"
        assert path.read_bytes() == V1["state.bin"]

    # -- delete ------------------------------------------------------------------------------
    @LAYOUTS
    def test_delete_removes_the_entry(self, store, layout):
        m = commit(store, layout, "ckpt", V1)
        store.delete(m)
        assert listed(store) == [] and store.orphans().dead == []
        with pytest.raises(CheckpointNotFoundError, match="gone, not damaged"):
            store.verify(m)

    @LAYOUTS
    def test_delete_keeps_other_entries(self, store, layout):
        doomed = commit(store, layout, "a", V1)
        commit(store, layout, "b", V2)
        store.delete(doomed)
        self.assert_only_version(store, layout, "b", V2)

    @LAYOUTS
    def test_verify_of_a_checkpoint_saved_again_meanwhile_says_it_is_gone(self, store, layout):
        old = commit(store, layout, "ckpt", V1)
        commit(store, layout, "ckpt", V2)
        with pytest.raises(CheckpointNotFoundError, match="deleted or saved again"):
            store.verify(old)

    # -- integrity ---------------------------------------------------------------------------
    def test_model_files_without_a_manifest_are_listed_as_unmanaged_only(self, store, put_foreign):
        commit_file(store, "best.keras", b"saved by keepbest")
        for name in ("model.keras", "notes.txt"):
            put_foreign(store, name, b"saved by someone else")
        listing = store.list()
        assert [m.name for m in listing.manifests] == ["best.keras"] and listing.unmanaged == ["model.keras"]

    @LAYOUTS
    def test_verify_reports_progress_in_bytes_file_by_file(self, store, layout):
        m = commit(store, layout, "ckpt", V1)
        seen = []
        store.verify(m, progress=seen.append)
        assert seen == [f.size for f in m.files]

    @LAYOUTS
    def test_verify_passes_on_an_intact_checkpoint(self, store, layout):
        assert store.verify(commit(store, layout, "ckpt", V1)) is None

    @LAYOUTS
    def test_verify_raises_naming_the_file_with_a_flipped_bit(self, store, tamper, layout):
        m = commit(store, layout, "ckpt", V1)
        where = tamper(store, m, m.files[-1].path, "flip")
        with pytest.raises(CorruptCheckpointError, match=f"file {re.escape(where)} does not match its manifest"):
            store.verify(m)

    @LAYOUTS
    def test_a_truncated_file_is_not_listed_and_verify_names_it(self, store, tamper, layout):
        m = commit(store, layout, "ckpt", V1)
        where = tamper(store, m, m.files[-1].path, "truncate")
        (damaged,) = store.list().damaged
        assert store.list().manifests == [] and damaged.name == "ckpt" and where in damaged.reason
        with pytest.raises(CorruptCheckpointError, match=f"file {re.escape(where)} does not match its manifest"):
            store.verify(m)

    @LAYOUTS
    def test_a_missing_file_is_not_listed_and_verify_names_it(self, store, tamper, layout):
        m = commit(store, layout, "ckpt", V1)
        where = tamper(store, m, m.files[0].path, "delete")
        (damaged,) = store.list().damaged
        assert store.list().manifests == [] and f"file {where} is missing" in damaged.reason
        assert damaged.manifest == m
        with pytest.raises(CorruptCheckpointError, match=f"file {re.escape(where)} is missing"):
            store.verify(m)

    def test_recover_removes_the_stale_manifest_of_a_file_deleted_by_hand(self, store, tamper):
        m = commit_file(store, "best.keras", b"12345")
        commit_file(store, "other.keras", b"kept")
        tamper(store, m, "best.keras", "delete")
        report = store.recover()
        assert report.stale == ["best.keras"]
        assert [x.name for x in listed(store)] == ["other.keras"]
        commit_file(store, "best.keras", b"new")  # saved again as if it had never been written
        assert sorted(x.name for x in listed(store)) == ["best.keras", "other.keras"]

    # -- recovery ----------------------------------------------------------------------------
    def test_recover_of_a_clean_store_changes_nothing(self, store):
        commit_dir(store, "ckpt", V1)
        report = store.recover()
        assert not report.changed and report.undecided == [] and store.orphans().dead == []

    # -- records -----------------------------------------------------------------------------
    def test_a_record_that_was_never_written_reads_as_none(self, store):
        assert store.read_record(store.record_key("aliases", "s")) is None

    def test_write_record_then_read_returns_the_bytes_and_a_token(self, store):
        key = store.record_key("aliases", "e{epoch:02d}.keras")
        token = store.write_record(key, b'{"a": 1}', expect=None)
        record = store.read_record(key)
        assert (record.data, record.token, record.key) == (b'{"a": 1}', token, key)

    def test_write_record_with_expect_none_refuses_an_existing_record(self, store):
        key = store.record_key("r")
        store.write_record(key, b"1", expect=None)
        with pytest.raises(RecordConflictError, match="changed since it was read"):
            store.write_record(key, b"2", expect=None)
        assert store.read_record(key).data == b"1"

    def test_write_record_with_a_stale_token_is_refused(self, store):
        key = store.record_key("r")
        first = store.write_record(key, b"1", expect=None)
        store.write_record(key, b"2", expect=first)
        with pytest.raises(RecordConflictError):
            store.write_record(key, b"3", expect=first)
        assert store.read_record(key).data == b"2"

    def test_write_record_with_any_overwrites(self, store):
        key = store.record_key("r")
        store.write_record(key, b"1", expect=None)
        store.write_record(key, b"2", expect=ANY)
        assert store.read_record(key).data == b"2"

    def test_update_record_loses_no_update_between_threads(self, store):
        key = store.record_key("counter")

        def bump():
            for _ in range(25):
                store.update_record(key, lambda r: str(int(r.data) + 1 if r else 1).encode())

        threads = [threading.Thread(target=bump) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert store.read_record(key).data == b"100"

    def test_delete_record_and_list_records(self, store):
        keys = [store.record_key("evaluations", "eval", n) for n in ("ckpt-1", "a/b", "x" * 300)]
        for k in keys:
            store.write_record(k, b"{}")
        store.write_record(store.record_key("evaluators", "eval"), b"{}")
        assert sorted(store.list_records(store.record_key("evaluations"))) == sorted(keys)
        store.delete_record(keys[0])
        store.delete_record(keys[0])  # absent: nothing to do
        assert sorted(store.list_records(store.record_key("evaluations", "eval"))) == sorted(keys[1:])
        assert store.list_records(store.record_key("nothing")) == []

    def test_set_aside_keeps_a_damaged_record_under_a_new_key(self, store):
        key = store.record_key("aliases", "s")
        store.write_record(key, b"garbage")
        aside = store.set_aside(key)
        assert store.read_record(key) is None and store.read_record(aside).data == b"garbage"
        assert store.set_aside(key) is None

    def test_records_are_not_checkpoints(self, store):
        store.write_record(store.record_key("aliases", "s"), b"{}")
        commit_dir(store, "ckpt", V1)
        assert [m.name for m in listed(store)] == ["ckpt"]

    # -- snapshots and watching ----------------------------------------------------------------
    @LAYOUTS
    def test_snapshot_keeps_the_bytes_of_a_checkpoint_replaced_meanwhile(self, store, layout):
        m = commit(store, layout, "ckpt", V1)
        snap = store.snapshot(m)
        commit(store, layout, "ckpt", V2)
        path = snap if layout == "file" else snap / "state.bin"
        assert path.read_bytes() == V1["state.bin"]
        store.release(snap)
        assert not snap.exists() and store.orphans().dead == []

    def test_watch_returns_soon_after_a_commit_not_at_its_timeout(self, store):
        import time

        commit_dir(store, "first", V1)  # the folder exists, so the watch can see it
        with store.watch(poll_interval=0.2) as watch:
            timer = threading.Timer(0.1, lambda: commit_dir(store, "second", V1))
            started = time.monotonic()
            timer.start()
            watch.wait(30)
            waited = time.monotonic() - started
            timer.join()
        print(f"watch returned after {waited:.2f} s (timeout 30 s)")
        assert waited < 10 and [m.name for m in listed(store)] == ["first", "second"]
