"""keepbest.store.LocalStore: the contract suite, and what only a local folder does.

Faults are injected through the ``_reached(point)`` seam. A *failure* raises there and lets the
store's own exception handling run (the process lives on). A *crash* also copies the store's
directory as it is at that instant, before any handler runs, and gives the writer's files in the
copy the owner token of a dead process: what a kill -9 would leave for the next process.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

from keepbest.errors import StorageError
from keepbest.manifest import FileEntry, Manifest
from keepbest.store import LocalStore, _fs, _names, liveness, owner_token
from keepbest.store._names import DELETING, INDEX, MANIFEST, OLD, PENDING, TMP, TRASH
from tests.helpers import flip_byte, token_of
from tests.store.contract import V1, V2, StoreContract, commit, commit_dir, commit_file, contents, expected, listed


def _tamper(store, m, rel, how):
    path = store.file_path(m, rel)
    if how == "flip":
        flip_byte(path, len(path.read_bytes()) // 2, 0x01)
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[:-1])
    else:
        path.unlink()
    return str(path)


class TestLocalStore(StoreContract):
    @pytest.fixture
    def store(self, tmp_path):
        return LocalStore(tmp_path / "store")

    @pytest.fixture
    def tamper(self):
        return _tamper

    @pytest.fixture
    def put_foreign(self):
        def put(store, name, data):
            store.root.mkdir(parents=True, exist_ok=True)
            (store.root / name).write_bytes(data)
        return put


# --- fault injection ----------------------------------------------------------------------------------


class InjectedFault(Exception):
    pass


class FailingStore(LocalStore):
    """Raises at one point of commit/delete; the store's handlers then run as in production."""

    def __init__(self, root, point):
        super().__init__(root)
        self.point = point

    def _reached(self, point):
        if point == self.point:
            raise InjectedFault(point)


class CrashingStore(FailingStore):
    """Like FailingStore, but first copies the directory: the state a kill -9 would leave."""

    def __init__(self, root, point, image, dead_token):
        super().__init__(root, point)
        self.image = image
        self.dead_token = dead_token

    def _reached(self, point):
        if point == self.point:
            shutil.copytree(self.root, self.image, symlinks=True)
            rename_owner(self.image, owner_token(), self.dead_token)
        super()._reached(point)


def rename_owner(root, owner, new_owner):
    """Gives every work-in-progress name of writer ``owner`` under ``root`` the token ``new_owner``."""
    for dirpath, dirs, files in os.walk(root, topdown=False):
        for name in files + dirs:
            if owner in name:
                os.rename(os.path.join(dirpath, name), os.path.join(dirpath, name.replace(owner, new_owner)))


def exchange_supported(tmp_path):
    a, b = tmp_path / "probe-a", tmp_path / "probe-b"
    a.mkdir()
    b.mkdir()
    try:
        return _fs.exchange(a, b)
    finally:
        a.rmdir()
        b.rmdir()


@pytest.fixture
def replace_mode(request, tmp_path, monkeypatch):
    """How a dir entry is replaced: atomic exchange, or move aside + rename (+ recover)."""
    mode = request.param
    if mode == "exchange" and not exchange_supported(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available on this filesystem")
    if mode == "two-renames":
        monkeypatch.setattr(_fs, "exchange", lambda a, b: False)
    return mode


def temp_entries(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".keepbest-"))


def assert_only_version(store, layout, name, version):
    (m,) = listed(store)
    assert m.name == name
    store.verify(m)
    assert contents(store, m) == expected(layout, version)


# --- the local layout ----------------------------------------------------------------------------------


def test_commit_dir_writes_manifest_json_inside_the_folder(tmp_path):
    committed = commit_dir(LocalStore(tmp_path), "ckpt-1", V1)
    assert Manifest.from_json((tmp_path / "ckpt-1" / MANIFEST).read_bytes(), source="m") == committed


@pytest.mark.parametrize("layout", ["file", "dir"])
def test_commit_leaves_no_temporary_entries(tmp_path, layout):
    store = LocalStore(tmp_path)
    commit(store, layout, "ckpt", V1)
    commit(store, layout, "ckpt", V2)
    assert temp_entries(tmp_path) == [] and sorted(p.name for p in store.index.glob("*") if p.suffix == ".json") \
        == (["ckpt.json"] if layout == "file" else [])


def test_staged_dir_is_not_listed_even_with_a_manifest_inside(tmp_path):
    store = LocalStore(tmp_path)
    staged = store.stage("ckpt-1", "dir")
    (staged.local_path() / MANIFEST).write_bytes(Manifest(name="ckpt-1", layout="dir", format="b", series="s").to_json())
    assert listed(store) == []


def test_pending_manifest_is_not_listed(tmp_path):
    store = LocalStore(tmp_path)
    store.index.mkdir(parents=True)
    (tmp_path / "model.keras").write_bytes(b"data")
    m = Manifest(name="model.keras", layout="file", format="b", series="s")
    (store.index / _names.intent(PENDING, "model.keras")).write_bytes(m.to_json())
    assert listed(store) == []


def test_list_reports_an_unreadable_manifest_as_damaged(tmp_path):
    store = LocalStore(tmp_path)
    commit_dir(store, "good", V1)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST).write_bytes(b"{not json")
    listing = store.list()
    assert [m.name for m in listing.manifests] == ["good"]
    (damaged,) = listing.damaged
    assert damaged.name == "bad" and str(tmp_path / "bad" / MANIFEST) in damaged.reason and damaged.manifest is None


def test_list_names_a_renamed_checkpoint_folder_by_where_it_is(tmp_path):
    store = LocalStore(tmp_path)
    commit_dir(store, "ckpt-1", V1)
    (tmp_path / "ckpt-1").rename(tmp_path / "copy")
    (m,) = listed(store)
    assert m.name == "copy"
    store.verify(m)


def test_a_relative_root_is_pinned_when_the_store_is_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = LocalStore("runs")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    commit_dir(store, "ckpt", V1)
    assert (tmp_path / "runs" / "ckpt" / MANIFEST).is_file() and not (tmp_path / "elsewhere" / "runs").exists()


def test_stage_raises_storage_error_when_root_cannot_be_created(tmp_path):
    (tmp_path / "afile").write_bytes(b"")
    store = LocalStore(tmp_path / "afile" / "sub")
    with pytest.raises(StorageError, match="Cannot create checkpoint directory .*afile/sub"):
        store.stage("x", "dir")


@pytest.mark.parametrize("layout", ["file", "dir"])
def test_names_of_work_in_progress_fit_wherever_the_final_name_fits(tmp_path, layout):
    name = "n" * 249 + ".keras"  # 255 bytes: the longest name a filesystem takes must work here too
    store = LocalStore(tmp_path)
    staged = store.stage(name, layout)
    assert len(staged.local_path().name) < 200 and staged.local_path().name.endswith(".keras")
    store.discard(staged)
    commit(store, layout, name, V1)
    commit(store, layout, name, V2)
    store.delete(listed(store)[0])
    assert listed(store) == [] and temp_entries(tmp_path) == []


# --- replacing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("replace_mode", ["exchange", "two-renames"], indirect=True)
def test_commit_replaces_an_existing_dir_entry(tmp_path, replace_mode):
    store = LocalStore(tmp_path)
    commit(store, "dir", "ckpt", V1)
    commit(store, "dir", "ckpt", {"state.bin": b"only this file now"})
    assert_only_version(store, "dir", "ckpt", {"state.bin": b"only this file now"})
    assert temp_entries(tmp_path) == []


@pytest.mark.parametrize("replace_mode", ["exchange", "two-renames"], indirect=True)
def test_commit_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path, replace_mode):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "precious.txt").write_bytes(b"user data")
    store = LocalStore(tmp_path)
    with pytest.raises(StorageError, match=re.escape(f"Cannot save checkpoint to {tmp_path / 'ckpt'}: it exists "
                                                     "and is not a keepbest checkpoint")):
        commit(store, "dir", "ckpt", V1)


def test_refused_replacement_leaves_the_directory_untouched(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "precious.txt").write_bytes(b"user data")
    store = LocalStore(tmp_path)
    with pytest.raises(StorageError, match="not a keepbest checkpoint"):
        commit(store, "dir", "ckpt", V1)
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["precious.txt"]
    assert (tmp_path / "ckpt" / "precious.txt").read_bytes() == b"user data"
    assert temp_entries(tmp_path) == [] and listed(store) == []


def test_commit_file_onto_a_directory_raises(tmp_path):
    (tmp_path / "model.keras").mkdir()
    with pytest.raises(IsADirectoryError, match="it is an existing directory. Choose a file path"):
        commit(LocalStore(tmp_path), "file", "model.keras", V1)


def test_a_checkpoint_file_that_is_a_link_is_written_through_to_its_target(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (tmp_path / "run").mkdir()
    link = tmp_path / "run" / "best.keras"
    link.symlink_to(shared / "target.keras")
    store = LocalStore(tmp_path / "run")
    commit_file(store, "best.keras", b"first")
    commit_file(store, "best.keras", b"second")
    assert link.is_symlink() and (shared / "target.keras").read_bytes() == b"second"
    assert temp_entries(tmp_path / "run") == [] and temp_entries(shared) == []
    (m,) = listed(store)
    store.verify(m)


# --- failures during commit -------------------------------------------------------------------------------

BEFORE_PUBLISH = [
    ("file", None, "staged"),
    ("file", None, "intent_written"),
    ("dir", "exchange", "staged"),
    ("dir", "two-renames", "staged"),
    ("dir", "two-renames", "old_moved_aside"),
]


@pytest.mark.parametrize(("layout", "replace_mode", "point"), BEFORE_PUBLISH, indirect=["replace_mode"])
def test_failed_commit_keeps_the_previous_version(tmp_path, layout, replace_mode, point):
    commit(LocalStore(tmp_path), layout, "ckpt", V1)
    with pytest.raises(InjectedFault, match=point):
        commit(FailingStore(tmp_path, point), layout, "ckpt", V2)
    assert_only_version(LocalStore(tmp_path), layout, "ckpt", V1)


@pytest.mark.parametrize(("layout", "replace_mode", "point"), BEFORE_PUBLISH, indirect=["replace_mode"])
def test_failed_commit_removes_the_staged_temp(tmp_path, layout, replace_mode, point):
    commit(LocalStore(tmp_path), layout, "ckpt", V1)
    with pytest.raises(InjectedFault, match=point):
        commit(FailingStore(tmp_path, point), layout, "ckpt", V2)
    assert temp_entries(tmp_path) == []


@pytest.mark.parametrize("layout", ["file", "dir"])
def test_failed_first_commit_lists_nothing_and_leaves_no_temp(tmp_path, layout):
    with pytest.raises(InjectedFault, match="staged"):
        commit(FailingStore(tmp_path, "staged"), layout, "ckpt", V1)
    assert listed(LocalStore(tmp_path)) == [] and temp_entries(tmp_path) == []


@pytest.mark.parametrize("replace_mode", ["exchange", "two-renames"], indirect=True)
def test_dir_commit_failing_after_publish_leaves_the_new_version(tmp_path, replace_mode):
    commit(LocalStore(tmp_path), "dir", "ckpt", V1)
    with pytest.raises(InjectedFault, match="data_published"):
        commit(FailingStore(tmp_path, "data_published"), "dir", "ckpt", V2)
    assert_only_version(LocalStore(tmp_path), "dir", "ckpt", V2)


def test_file_commit_failing_after_publish_leaves_a_verifiable_checkpoint(tmp_path):
    commit(LocalStore(tmp_path), "file", "model.keras", V1)
    with pytest.raises(InjectedFault, match="data_published"):
        commit(FailingStore(tmp_path, "data_published"), "file", "model.keras", V2)
    (m,) = listed(LocalStore(tmp_path))
    LocalStore(tmp_path).verify(m)


# --- crashes and recover() ----------------------------------------------------------------------------------


def crash(tmp_path, dead_token, point, action):
    """Runs ``action(store)`` on a store that crashes at ``point``; returns a store on the crash image."""
    live, image = tmp_path / "live", tmp_path / "image"
    store = CrashingStore(live, point, image, dead_token)
    with pytest.raises(InjectedFault, match=point):
        action(store)
    return LocalStore(image)


def test_recover_rolls_forward_file_commit_whose_data_was_published(tmp_path, dead_token):
    commit(LocalStore(tmp_path / "live"), "file", "model.keras", V1)
    store = crash(tmp_path, dead_token, "data_published", lambda s: commit(s, "file", "model.keras", V2))
    report = store.recover()
    assert report.rolled_forward == ["model.keras"] and report.rolled_back == []
    assert_only_version(store, "file", "model.keras", V2)


def test_recover_rolls_back_file_commit_whose_data_was_not_published(tmp_path, dead_token):
    commit(LocalStore(tmp_path / "live"), "file", "model.keras", V1)
    store = crash(tmp_path, dead_token, "intent_written", lambda s: commit(s, "file", "model.keras", V2))
    report = store.recover()
    assert report.rolled_back == ["model.keras"] and report.rolled_forward == []
    assert_only_version(store, "file", "model.keras", V1)


def _pending_of(store, name, token):
    return store.index / _names.intent(PENDING, name).replace(owner_token(), token)


def test_recover_rolls_back_a_pending_intent_that_does_not_match_the_data(tmp_path, dead_token):
    store = LocalStore(tmp_path)
    commit(store, "file", "model.keras", V1)
    intent = Manifest(name="model.keras", layout="file", format="bytes", series="s",
                      files=(FileEntry("model.keras", 3, "0" * 64),))
    pending = _pending_of(store, "model.keras", dead_token)
    pending.write_bytes(intent.to_json())
    report = store.recover()
    assert report.rolled_back == ["model.keras"] and not pending.exists()
    assert_only_version(store, "file", "model.keras", V1)


def test_recover_rolls_back_an_unreadable_pending_intent(tmp_path, dead_token):
    store = LocalStore(tmp_path)
    commit(store, "file", "model.keras", V1)
    pending = _pending_of(store, "model.keras", dead_token)
    pending.write_bytes(b"{truncated")
    assert store.recover().rolled_back == [pending.name]
    assert_only_version(store, "file", "model.keras", V1)


def test_recover_ignores_a_pending_intent_of_a_live_writer(tmp_path):
    store = LocalStore(tmp_path)
    commit(store, "file", "model.keras", V1)
    pending = store.index / _names.intent(PENDING, "model.keras")
    pending.write_bytes(b"{}")
    store.recover()
    assert pending.exists()


def test_recover_removes_the_staged_temp_of_a_crashed_commit(tmp_path, dead_token):
    commit(LocalStore(tmp_path / "live"), "dir", "ckpt", V1)
    store = crash(tmp_path, dead_token, "staged", lambda s: commit(s, "dir", "ckpt", V2))
    assert temp_entries(store.root) != []
    store.recover()
    assert temp_entries(store.root) == []
    assert_only_version(store, "dir", "ckpt", V1)


def test_crash_with_old_dir_moved_aside_lists_nothing_until_recovered(tmp_path, dead_token, monkeypatch):
    monkeypatch.setattr(_fs, "exchange", lambda a, b: False)
    commit(LocalStore(tmp_path / "live"), "dir", "ckpt", V1)
    store = crash(tmp_path, dead_token, "old_moved_aside", lambda s: commit(s, "dir", "ckpt", V2))
    assert listed(store) == []


def test_recover_restores_a_dir_moved_aside_by_a_crashed_writer(tmp_path, dead_token, monkeypatch):
    monkeypatch.setattr(_fs, "exchange", lambda a, b: False)
    commit(LocalStore(tmp_path / "live"), "dir", "ckpt", V1)
    store = crash(tmp_path, dead_token, "old_moved_aside", lambda s: commit(s, "dir", "ckpt", V2))
    report = store.recover()
    assert report.restored == ["ckpt"]
    assert_only_version(store, "dir", "ckpt", V1)
    assert temp_entries(store.root) == []


@pytest.mark.parametrize("replace_mode", ["exchange", "two-renames"], indirect=True)
def test_recover_removes_the_old_dir_once_the_new_one_is_in_place(tmp_path, dead_token, replace_mode):
    commit(LocalStore(tmp_path / "live"), "dir", "ckpt", V1)
    store = crash(tmp_path, dead_token, "data_published", lambda s: commit(s, "dir", "ckpt", V2))
    report = store.recover()
    assert report.restored == [] and len(report.removed) == 1
    assert_only_version(store, "dir", "ckpt", V2)
    assert temp_entries(store.root) == []


def test_recover_is_idempotent(tmp_path, dead_token, monkeypatch):
    monkeypatch.setattr(_fs, "exchange", lambda a, b: False)
    commit(LocalStore(tmp_path / "live"), "dir", "ckpt", V1)
    store = crash(tmp_path, dead_token, "old_moved_aside", lambda s: commit(s, "dir", "ckpt", V2))
    store.recover()
    report = store.recover()
    assert not report.changed
    assert_only_version(store, "dir", "ckpt", V1)


@pytest.mark.parametrize("layout", ["file", "dir"])
def test_delete_removes_the_entry_and_its_manifest_from_the_folder(tmp_path, layout):
    store = LocalStore(tmp_path)
    store.delete(commit(store, layout, "ckpt", V1))
    assert not (tmp_path / "ckpt").exists() and temp_entries(tmp_path) == []
    assert [p.name for p in store.index.glob("*") if p.name != _names.LOCK] == []


@pytest.mark.parametrize("layout", ["file", "dir"])
def test_delete_crash_after_uncommit_lists_no_checkpoint(tmp_path, dead_token, layout):
    m = commit(LocalStore(tmp_path / "live"), layout, "ckpt", V1)
    store = crash(tmp_path, dead_token, "uncommitted", lambda s: s.delete(m))
    assert listed(store) == []


@pytest.mark.parametrize("layout", ["file", "dir"])
def test_recover_removes_what_a_crashed_delete_left(tmp_path, dead_token, layout):
    m = commit(LocalStore(tmp_path / "live"), layout, "ckpt", V1)
    store = crash(tmp_path, dead_token, "uncommitted", lambda s: s.delete(m))
    assert store.orphans().dead != []
    report = store.recover()
    assert len(report.removed) == 1
    assert sorted(p.name for p in store.root.iterdir()) == [INDEX] or layout == "dir"
    assert temp_entries(store.root) == [] and not (store.root / "ckpt").exists()
    assert store.orphans().dead == []


def test_recover_after_failed_delete_keeps_a_later_commit_of_the_same_name(tmp_path):
    store = LocalStore(tmp_path)
    m = commit(store, "file", "model.keras", V1)
    with pytest.raises(InjectedFault, match="uncommitted"):
        FailingStore(tmp_path, "uncommitted").delete(m)
    commit(store, "file", "model.keras", V2)
    store.recover()
    assert_only_version(store, "file", "model.keras", V2)


# --- owners: host, PID namespace, pid and start time ---------------------------------------------------------


def test_owner_tokens_name_the_host_the_pid_namespace_the_pid_and_its_start_time():
    host, ns, pid, start = owner_token().split(".")
    assert host == _names.host_id() and int(pid) == os.getpid() and int(start) > 0
    assert int(ns) == os.stat("/proc/self/ns/pid").st_ino
    assert liveness(owner_token()) == "alive"


def test_a_token_from_another_host_is_never_judged_dead_by_this_hosts_recovery(tmp_path, dead_token):
    host, ns, pid, start = dead_token.split(".")
    other_host = f"{(int(host, 16) ^ 1):08x}.{ns}.{pid}.{start}"
    assert liveness(dead_token) == "dead" and liveness(other_host) == "unknown"
    theirs = tmp_path / f"{TMP}{other_host}-abcd-ckpt"
    ours = tmp_path / f"{TMP}{dead_token}-abcd-ckpt"
    theirs.mkdir()
    ours.mkdir()
    report = LocalStore(tmp_path).recover()
    assert theirs.is_dir() and report.undecided == [str(theirs)]
    assert not ours.exists() and report.removed == [str(ours)]


def test_a_token_from_another_pid_namespace_is_never_judged_dead(dead_token):
    host, ns, pid, start = dead_token.split(".")
    assert liveness(f"{host}.{int(ns) + 1}.{pid}.{start}") == "unknown"


def test_a_token_of_keepbest_0_2_without_a_host_is_never_judged_dead(dead_token):
    pid = dead_token.split(".")[2]
    assert liveness(f"{pid}.1") == "unknown" and liveness(pid) == "unknown"


def test_an_earlier_process_that_had_our_pid_is_dead():
    host, ns, pid, start = owner_token().split(".")
    assert liveness(f"{host}.{ns}.{pid}.{int(start) + 1}") == "dead"


def test_a_live_process_of_this_namespace_is_alive():
    assert liveness(token_of(os.getppid())) == "alive"


@pytest.mark.parametrize("make", [
    lambda root, t: (root / f"{TMP}{t}-abcd-ckpt").mkdir(),
    lambda root, t: (root / f"{TMP}{t}-abcd-model.keras").write_bytes(b"x"),
    lambda root, t: (root / f"{OLD}{t}-abcd-ckpt").mkdir(),
    lambda root, t: (root / f"{TRASH}{t}-abcd-ckpt").mkdir(),
    lambda root, t: (root / INDEX / f"{TMP}{t}-abcd.json").write_bytes(b"x"),
    lambda root, t: (root / INDEX / f"{PENDING}{t}-0123456789abcdef.json").write_bytes(b"x"),
    lambda root, t: (root / INDEX / f"{DELETING}{t}-0123456789abcdef.json").write_bytes(b"{}"),
    lambda root, t: (root / INDEX / "evaluators" / f"{TMP}{t}-abcd.json").write_bytes(b"{"),
], ids=["tmp-dir", "tmp-file", "old", "trash", "index-tmp", "pending", "deleting", "record-tmp"])
def test_orphans_lists_leftovers_of_dead_writers_only(tmp_path, dead_token, make):
    store = LocalStore(tmp_path)
    (store.index / "evaluators").mkdir(parents=True)
    make(tmp_path, owner_token())  # ours: alive, in progress
    make(tmp_path, dead_token)
    orphans = store.orphans()
    (found,) = orphans.dead
    assert dead_token in found and orphans.undecided == []


def test_leftovers_of_another_pid_namespace_are_left_and_reported(tmp_path, dead_token):
    host, ns, pid, start = dead_token.split(".")
    foreign = tmp_path / f"{TMP}{host}.{int(ns) + 1}.{pid}.{start}-abcd-model.keras"
    foreign.write_bytes(b"a live writer's bytes, for all we know")
    report = LocalStore(tmp_path).recover()
    assert report.undecided == [str(foreign)] and foreign.exists() and not report.changed


def test_orphans_ignores_committed_and_foreign_entries(tmp_path, dead_token):
    store = LocalStore(tmp_path)
    commit(store, "dir", "ckpt", V1)
    commit(store, "file", "model.keras", V1)
    (tmp_path / f"notes-{dead_token}.txt").write_bytes(b"mine")
    (tmp_path / ".keepbest-tmp-notapid-x").write_bytes(b"?")
    assert store.orphans().dead == [] and store.orphans().undecided == []


def test_recover_leaves_a_live_writers_staged_entry(tmp_path):
    store = LocalStore(tmp_path)
    staged = store.stage("ckpt", "dir")
    store.recover()
    assert staged.local_path().is_dir()


def test_pending_commit_of_an_earlier_process_with_our_pid_is_rolled_forward(tmp_path):
    host, ns, pid, start = owner_token().split(".")
    earlier = f"{host}.{ns}.{pid}.{int(start) + 1}"
    store = LocalStore(tmp_path)
    commit(store, "file", "model.keras", V1)
    m2 = commit(LocalStore(tmp_path / "scratch"), "file", "model.keras", V2)
    # The state a kill -9 between the data rename and the manifest rename leaves behind:
    shutil.copyfile(tmp_path / "scratch" / "model.keras", tmp_path / "model.keras")
    _pending_of(store, "model.keras", earlier).write_bytes(m2.to_json())
    assert store.recover().rolled_forward == ["model.keras"]
    store.verify(listed(store)[0])


def test_verify_checks_sha256_digests_of_keepbest_0_1_manifests(tmp_path):
    import hashlib

    from keepbest.errors import CorruptCheckpointError

    store = LocalStore(tmp_path)
    committed = commit_dir(store, "ckpt-1", {"a.bin": b"12345"})
    old = committed.with_files((FileEntry("a.bin", 5, hashlib.sha256(b"12345").hexdigest(), "sha256"),))
    store.verify(old)
    (tmp_path / "ckpt-1" / "a.bin").write_bytes(b"12346")
    with pytest.raises(CorruptCheckpointError, match=r"a.bin does not match its manifest.*sha256="):
        store.verify(old)


def test_verify_names_a_truncated_large_file(tmp_path):
    from keepbest.errors import CorruptCheckpointError

    store = LocalStore(tmp_path)
    committed = commit_file(store, "m.keras", b"x" * (20 << 20))
    with open(tmp_path / "m.keras", "r+b") as f:
        f.truncate(10 << 20)
    with pytest.raises(CorruptCheckpointError, match=rf"file {tmp_path}/m.keras does not match.*size=10485760"):
        store.verify(committed)


def test_replacing_is_true_only_while_a_live_writer_holds_a_pending_intent(tmp_path, dead_token):
    store = LocalStore(tmp_path)
    (tmp_path / INDEX).mkdir()
    assert not store.replacing("a.keras")
    pending = store.index / _names.intent(PENDING, "a.keras")
    pending.write_text("{}")
    assert store.replacing("a.keras") and not store.replacing("b.keras")
    pending.rename(_pending_of(store, "a.keras", dead_token))  # its writer is dead: an orphan
    assert not store.replacing("a.keras")


def test_orphaned_temp_files_of_records_are_cleaned(tmp_path, dead_token):
    store = LocalStore(tmp_path)
    records = tmp_path / INDEX / "evaluations" / "eval"
    records.mkdir(parents=True)
    dead = records / f"{TMP}{dead_token}-abcd.json"
    live = records / f"{TMP}{owner_token()}-abcd.json"
    dead.write_text("{")
    live.write_text("{")
    store.recover()
    assert not dead.exists() and live.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs Linux, root and unshare(1) to run gc in a PID namespace of its own")
def test_gc_in_another_pid_namespace_never_removes_a_live_saves_files(tmp_path):
    store = LocalStore(tmp_path)
    staged = store.stage("ckpt-9", "dir")
    staged.write("a.bin", b"a live writer's bytes")
    pending = store.index / _names.intent(PENDING, "model.keras")
    pending.parent.mkdir(exist_ok=True)
    pending.write_bytes(b"{}")
    gc = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "keepbest.cli", "gc",
                         str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert gc.returncode == 0, gc.stderr
    assert staged.local_path().is_dir() and pending.exists()
    assert "another PID namespace" in gc.stdout and str(staged.local_path()) in gc.stdout
    store.commit(staged, Manifest(name="ckpt-9", layout="dir", format="b", series="s"))  # the save goes on
    assert [m.name for m in listed(store)] == ["ckpt-9"]
