"""keepbest.storage.LocalStore: atomic commit, un-commit first, crash recovery, verification.

Faults are injected through the ``_reached(point)`` seam. A *failure* raises there and lets the
store's own exception handling run (the process lives on). A *crash* also copies the store's
directory as it is at that instant, before any handler runs, and renames the writer's pid in the
copy to a dead one: what a kill -9 would leave for the next process.
"""

import os
import re
import shutil
import subprocess

import pytest

from keepbest import _fs
from keepbest.errors import CorruptCheckpointError, StorageError
from keepbest.manifest import FileEntry, Manifest
from keepbest.storage import DELETING, INDEX_DIR, MANIFEST_NAME, OLD_PREFIX, PENDING, TMP_PREFIX, TRASH_PREFIX, LocalStore

V1 = {"state.bin": b"version one", "sub/extra.json": b'{"v": 1}'}
V2 = {"state.bin": b"version two, longer", "sub/extra.json": b'{"v": 2}'}


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
    """Like FailingStore, but first snapshots the directory: the state a kill -9 would leave."""

    def __init__(self, root, point, snapshot, dead_pid):
        super().__init__(root, point)
        self.snapshot = snapshot
        self.dead_pid = dead_pid

    def _reached(self, point):
        if point == self.point:
            shutil.copytree(self.root, self.snapshot, symlinks=True)
            rename_owner(self.snapshot, _fs.owner_token(), str(self.dead_pid))
        super()._reached(point)


def rename_owner(root, owner, new_owner):
    """Renames every keepbest temp/old/trash/pending/deleting name of writer ``owner`` to ``new_owner``."""
    for folder in (root, root / INDEX_DIR):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            name = p.name
            for prefix in (TMP_PREFIX, OLD_PREFIX, TRASH_PREFIX):
                if name.startswith(f"{prefix}{owner}-"):
                    name = f"{prefix}{new_owner}-" + name[len(f"{prefix}{owner}-"):]
            for marker in (PENDING, f"{DELETING}-"):
                if name.endswith(f"{marker}{owner}"):
                    name = name[: -len(owner)] + new_owner
            if name != p.name:
                p.rename(folder / name)


@pytest.fixture(scope="module")
def dead_pid():
    child = subprocess.Popen(["true"])
    child.wait()
    assert not _fs.owner_is_alive(str(child.pid))
    return child.pid


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


def commit_file(store, name, data, **fields):
    staged = store.stage(name)
    staged.write_bytes(data)
    return store.commit(staged, Manifest(name=name, layout="file", format="bytes", series="s", **fields))


def commit_dir(store, name, files, **fields):
    staged = store.stage(name)
    staged.mkdir()
    for rel, data in files.items():
        (staged / rel).parent.mkdir(parents=True, exist_ok=True)
        (staged / rel).write_bytes(data)
    return store.commit(staged, Manifest(name=name, layout="dir", format="bytes", series="s", **fields))


def commit(store, layout, name, version):
    if layout == "file":
        return commit_file(store, name, version["state.bin"])
    return commit_dir(store, name, version)


def read_entry(store, layout, name):
    """The payload bytes of entry ``name`` in the shape ``commit`` takes them."""
    if layout == "file":
        return {"state.bin": (store.root / name).read_bytes()}
    base = store.root / name
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME}


def expected(layout, version):
    return {"state.bin": version["state.bin"]} if layout == "file" else version


def listed(store):
    listing = store.list()
    assert listing.errors == []
    return listing.manifests


def temp_entries(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".keepbest-"))


def assert_only_version(store, layout, name, version):
    """Exactly one checkpoint is listed, it verifies, and it holds ``version``."""
    (m,) = listed(store)
    assert m.name == name
    store.verify(m)
    assert read_entry(store, layout, name) == expected(layout, version)


# --- commit and list ------------------------------------------------------------------------------


def test_commit_file_entry_lists_it_with_size_and_blake3(tmp_path):
    store = LocalStore(tmp_path)
    commit_file(store, "model.keras", b"12345")
    (m,) = listed(store)
    assert (m.name, m.layout, m.files) == ("model.keras", "file", (
        FileEntry("model.keras", 5, "86f2d80abe9c3f7b4a1a57a8d1130fa8dc08c81604833ce1212dc039b010d9e4"),))


def test_commit_dir_entry_lists_every_file_with_size_and_blake3(tmp_path):
    store = LocalStore(tmp_path)
    commit_dir(store, "ckpt-1", {"a.bin": b"12345", "sub/b.bin": b""})
    (m,) = listed(store)
    assert (m.name, m.layout, m.files) == ("ckpt-1", "dir", (
        FileEntry("a.bin", 5, "86f2d80abe9c3f7b4a1a57a8d1130fa8dc08c81604833ce1212dc039b010d9e4"),
        FileEntry("sub/b.bin", 0, "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"),
    ))


def test_commit_returns_the_manifest_that_is_listed(tmp_path):
    store = LocalStore(tmp_path)
    committed = commit_dir(store, "ckpt-1", V1, step=3, metrics={"loss": 0.5})
    assert listed(store) == [committed]


def test_commit_dir_writes_manifest_json_inside_the_folder(tmp_path):
    store = LocalStore(tmp_path)
    committed = commit_dir(store, "ckpt-1", V1)
    assert Manifest.from_json((tmp_path / "ckpt-1" / MANIFEST_NAME).read_bytes(), source="m") == committed


@pytest.mark.parametrize("layout", ["file", "dir"])
def test_commit_leaves_no_temporary_entries(tmp_path, layout):
    store = LocalStore(tmp_path)
    commit(store, layout, "ckpt", V1)
    commit(store, layout, "ckpt", V2)
    assert temp_entries(tmp_path) == [] and sorted(p.name for p in store.index.glob("*")) == (
        ["ckpt.json"] if layout == "file" else [])


def test_staged_file_is_not_listed_before_commit(tmp_path):
    store = LocalStore(tmp_path)
    store.stage("model.keras").write_bytes(b"data")
    assert listed(store) == []


def test_staged_dir_is_not_listed_even_with_a_manifest_inside(tmp_path):
    store = LocalStore(tmp_path)
    staged = store.stage("ckpt-1")
    staged.mkdir()
    (staged / MANIFEST_NAME).write_bytes(Manifest(name="ckpt-1", layout="dir", format="b", series="s").to_json())
    assert listed(store) == []


def test_pending_manifest_is_not_listed(tmp_path):
    store = LocalStore(tmp_path)
    store.index.mkdir(parents=True)
    (tmp_path / "model.keras").write_bytes(b"data")
    m = Manifest(name="model.keras", layout="file", format="b", series="s")
    (store.index / f"model.keras{PENDING}{os.getpid()}").write_bytes(m.to_json())
    assert listed(store) == []


def test_list_of_missing_root_is_empty(tmp_path):
    assert listed(LocalStore(tmp_path / "nope")) == []


def test_list_reports_unreadable_manifest_as_error(tmp_path):
    store = LocalStore(tmp_path)
    commit_dir(store, "good", V1)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST_NAME).write_bytes(b"{not json")
    listing = store.list()
    assert [m.name for m in listing.manifests] == ["good"]
    assert len(listing.errors) == 1 and str(tmp_path / "bad" / MANIFEST_NAME) in str(listing.errors[0])


def test_list_names_a_renamed_checkpoint_folder_by_where_it_is(tmp_path):
    store = LocalStore(tmp_path)
    commit_dir(store, "ckpt-1", V1)
    (tmp_path / "ckpt-1").rename(tmp_path / "copy")
    (m,) = listed(store)
    assert m.name == "copy"
    store.verify(m)


def test_stage_raises_storage_error_when_root_cannot_be_created(tmp_path):
    (tmp_path / "afile").write_bytes(b"")
    store = LocalStore(tmp_path / "afile" / "sub")
    with pytest.raises(StorageError, match="Cannot create checkpoint directory .*afile/sub"):
        store.stage("x")


# --- replacing ----------------------------------------------------------------------------------------


def test_commit_replaces_an_existing_file_entry(tmp_path):
    store = LocalStore(tmp_path)
    commit(store, "file", "model.keras", V1)
    commit(store, "file", "model.keras", V2)
    assert_only_version(store, "file", "model.keras", V2)


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
    store = LocalStore(tmp_path)
    with pytest.raises(IsADirectoryError, match="it is an existing directory. Choose a file path"):
        commit(store, "file", "model.keras", V1)


# --- failures during commit -----------------------------------------------------------------------------

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


def crash(tmp_path, dead_pid, point, action):
    """Runs ``action(store)`` on a store that crashes at ``point``; returns a store on the crash image."""
    live, image = tmp_path / "live", tmp_path / "image"
    store = CrashingStore(live, point, image, dead_pid)
    with pytest.raises(InjectedFault, match=point):
        action(store)
    return LocalStore(image)


def test_recover_rolls_forward_file_commit_whose_data_was_published(tmp_path, dead_pid):
    commit(LocalStore(tmp_path / "live"), "file", "model.keras", V1)
    store = crash(tmp_path, dead_pid, "data_published", lambda s: commit(s, "file", "model.keras", V2))
    report = store.recover()
    assert report.rolled_forward == ["model.keras"] and report.rolled_back == []
    assert_only_version(store, "file", "model.keras", V2)


def test_recover_rolls_back_file_commit_whose_data_was_not_published(tmp_path, dead_pid):
    commit(LocalStore(tmp_path / "live"), "file", "model.keras", V1)
    store = crash(tmp_path, dead_pid, "intent_written", lambda s: commit(s, "file", "model.keras", V2))
    report = store.recover()
    assert report.rolled_back == ["model.keras"] and report.rolled_forward == []
    assert_only_version(store, "file", "model.keras", V1)


def test_recover_rolls_back_a_pending_intent_that_does_not_match_the_data(tmp_path, dead_pid):
    store = LocalStore(tmp_path)
    commit(store, "file", "model.keras", V1)
    intent = Manifest(name="model.keras", layout="file", format="bytes", series="s",
                      files=(FileEntry("model.keras", 3, "0" * 64),))
    pending = store.index / f"model.keras{PENDING}{dead_pid}"
    pending.write_bytes(intent.to_json())
    report = store.recover()
    assert report.rolled_back == ["model.keras"] and not pending.exists()
    assert_only_version(store, "file", "model.keras", V1)


def test_recover_rolls_back_an_unreadable_pending_intent(tmp_path, dead_pid):
    store = LocalStore(tmp_path)
    commit(store, "file", "model.keras", V1)
    (store.index / f"model.keras{PENDING}{dead_pid}").write_bytes(b"{truncated")
    assert store.recover().rolled_back == ["model.keras"]
    assert_only_version(store, "file", "model.keras", V1)


def test_recover_ignores_a_pending_intent_of_a_live_writer(tmp_path):
    store = LocalStore(tmp_path)
    commit(store, "file", "model.keras", V1)
    pending = store.index / f"model.keras{PENDING}{os.getpid()}"
    pending.write_bytes(b"{}")
    store.recover()
    assert pending.exists()


def test_recover_removes_the_staged_temp_of_a_crashed_commit(tmp_path, dead_pid):
    commit(LocalStore(tmp_path / "live"), "dir", "ckpt", V1)
    store = crash(tmp_path, dead_pid, "staged", lambda s: commit(s, "dir", "ckpt", V2))
    assert temp_entries(store.root) != []
    store.recover()
    assert temp_entries(store.root) == []
    assert_only_version(store, "dir", "ckpt", V1)


def test_crash_with_old_dir_moved_aside_lists_nothing_until_recovered(tmp_path, dead_pid, monkeypatch):
    monkeypatch.setattr(_fs, "exchange", lambda a, b: False)
    commit(LocalStore(tmp_path / "live"), "dir", "ckpt", V1)
    store = crash(tmp_path, dead_pid, "old_moved_aside", lambda s: commit(s, "dir", "ckpt", V2))
    assert listed(store) == []


def test_recover_restores_a_dir_moved_aside_by_a_crashed_writer(tmp_path, dead_pid, monkeypatch):
    monkeypatch.setattr(_fs, "exchange", lambda a, b: False)
    commit(LocalStore(tmp_path / "live"), "dir", "ckpt", V1)
    store = crash(tmp_path, dead_pid, "old_moved_aside", lambda s: commit(s, "dir", "ckpt", V2))
    report = store.recover()
    assert report.restored == ["ckpt"]
    assert_only_version(store, "dir", "ckpt", V1)
    assert temp_entries(store.root) == []


@pytest.mark.parametrize("replace_mode", ["exchange", "two-renames"], indirect=True)
def test_recover_removes_the_old_dir_once_the_new_one_is_in_place(tmp_path, dead_pid, replace_mode):
    commit(LocalStore(tmp_path / "live"), "dir", "ckpt", V1)
    store = crash(tmp_path, dead_pid, "data_published", lambda s: commit(s, "dir", "ckpt", V2))
    report = store.recover()
    assert report.restored == [] and len(report.removed) == 1
    assert_only_version(store, "dir", "ckpt", V2)
    assert temp_entries(store.root) == []


def test_recover_is_idempotent(tmp_path, dead_pid, monkeypatch):
    monkeypatch.setattr(_fs, "exchange", lambda a, b: False)
    commit(LocalStore(tmp_path / "live"), "dir", "ckpt", V1)
    store = crash(tmp_path, dead_pid, "old_moved_aside", lambda s: commit(s, "dir", "ckpt", V2))
    store.recover()
    report = store.recover()
    assert (report.rolled_forward, report.rolled_back, report.restored, report.removed) == ([], [], [], [])
    assert_only_version(store, "dir", "ckpt", V1)


# --- delete ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["file", "dir"])
def test_delete_removes_the_entry_completely(tmp_path, layout):
    store = LocalStore(tmp_path)
    m = commit(store, layout, "ckpt", V1)
    store.delete(m)
    assert listed(store) == [] and not (tmp_path / "ckpt").exists() and temp_entries(tmp_path) == []
    assert list(store.index.glob("*")) == []


@pytest.mark.parametrize("layout", ["file", "dir"])
def test_delete_keeps_other_entries(tmp_path, layout):
    store = LocalStore(tmp_path)
    doomed = commit(store, layout, "a", V1)
    commit(store, layout, "b", V2)
    store.delete(doomed)
    assert_only_version(store, layout, "b", V2)


@pytest.mark.parametrize("layout", ["file", "dir"])
def test_delete_crash_after_uncommit_lists_no_checkpoint(tmp_path, dead_pid, layout):
    m = commit(LocalStore(tmp_path / "live"), layout, "ckpt", V1)
    store = crash(tmp_path, dead_pid, "uncommitted", lambda s: s.delete(m))
    assert listed(store) == []


@pytest.mark.parametrize("layout", ["file", "dir"])
def test_recover_removes_what_a_crashed_delete_left(tmp_path, dead_pid, layout):
    m = commit(LocalStore(tmp_path / "live"), layout, "ckpt", V1)
    store = crash(tmp_path, dead_pid, "uncommitted", lambda s: s.delete(m))
    assert store.orphans() != []
    report = store.recover()
    assert len(report.removed) == 1
    assert sorted(p.name for p in store.root.iterdir()) == [INDEX_DIR] or layout == "dir"
    assert temp_entries(store.root) == [] and not (store.root / "ckpt").exists()
    assert store.orphans() == []


def test_recover_after_failed_delete_keeps_a_later_commit_of_the_same_name(tmp_path):
    store = LocalStore(tmp_path)
    m = commit(store, "file", "model.keras", V1)
    with pytest.raises(InjectedFault, match="uncommitted"):
        FailingStore(tmp_path, "uncommitted").delete(m)
    commit(store, "file", "model.keras", V2)
    store.recover()
    assert_only_version(store, "file", "model.keras", V2)


# --- verify --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["file", "dir"])
def test_verify_passes_on_an_intact_checkpoint(tmp_path, layout):
    store = LocalStore(tmp_path)
    m = commit(store, layout, "ckpt", V1)
    assert store.verify(m) is None


@pytest.mark.parametrize("layout", ["file", "dir"])
def test_verify_raises_naming_the_file_with_a_flipped_bit(tmp_path, layout):
    store = LocalStore(tmp_path)
    m = commit(store, layout, "ckpt", V1)
    path = store.file_path(m, m.files[-1])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=re.escape(f"file {path} does not match its manifest")):
        store.verify(m)


@pytest.mark.parametrize("layout", ["file", "dir"])
def test_verify_raises_naming_the_file_when_truncated(tmp_path, layout):
    store = LocalStore(tmp_path)
    m = commit(store, layout, "ckpt", V1)
    path = store.file_path(m, m.files[0])
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CorruptCheckpointError, match=re.escape(f"file {path} does not match its manifest")):
        store.verify(m)


@pytest.mark.parametrize("layout", ["file", "dir"])
def test_verify_raises_naming_the_file_when_missing(tmp_path, layout):
    store = LocalStore(tmp_path)
    m = commit(store, layout, "ckpt", V1)
    path = store.file_path(m, m.files[0])
    path.unlink()
    with pytest.raises(CorruptCheckpointError, match=re.escape(f"is incomplete: file {path} is missing")):
        store.verify(m)


# --- orphans --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda root, pid: (root / f"{TMP_PREFIX}{pid}-abcd-ckpt").mkdir(),
        lambda root, pid: (root / f"{TMP_PREFIX}{pid}-abcd-model.keras").write_bytes(b"x"),
        lambda root, pid: (root / f"{OLD_PREFIX}{pid}-abcd-ckpt").mkdir(),
        lambda root, pid: (root / f"{TRASH_PREFIX}{pid}-abcd-ckpt").mkdir(),
        lambda root, pid: (root / INDEX_DIR / f"{TMP_PREFIX}{pid}-abcd-m.json{PENDING}{pid}").write_bytes(b"x"),
        lambda root, pid: (root / INDEX_DIR / f"m.json{PENDING}{pid}").write_bytes(b"x"),
    ],
    ids=["tmp-dir", "tmp-file", "old", "trash", "index-tmp", "pending"],
)
def test_orphans_lists_leftovers_of_dead_writers_only(tmp_path, dead_pid, make):
    store = LocalStore(tmp_path)
    store.index.mkdir()
    make(tmp_path, os.getpid())  # ours: alive, in progress
    make(tmp_path, dead_pid)
    (found,) = store.orphans()
    assert str(dead_pid) in found.name and str(os.getpid()) not in found.name


def test_orphans_lists_a_deleting_marker_of_a_dead_writer(tmp_path, dead_pid):
    store = LocalStore(tmp_path)
    store.index.mkdir()
    (store.index / f"model.keras{DELETING}-{dead_pid}").write_bytes(b"{}")
    assert store.orphans() == [store.index / f"model.keras{DELETING}-{dead_pid}"]


def test_orphans_ignores_committed_and_foreign_entries(tmp_path, dead_pid):
    store = LocalStore(tmp_path)
    commit(store, "dir", "ckpt", V1)
    commit(store, "file", "model.keras", V1)
    (tmp_path / f"notes-{dead_pid}.txt").write_bytes(b"mine")
    (tmp_path / ".keepbest-tmp-notapid-x").write_bytes(b"?")
    assert store.orphans() == []


def test_orphans_of_missing_root_is_empty(tmp_path):
    assert LocalStore(tmp_path / "nope").orphans() == []


def test_recover_leaves_a_live_writers_staged_entry(tmp_path):
    store = LocalStore(tmp_path)
    staged = store.stage("ckpt")
    staged.mkdir()
    store.recover()
    assert staged.is_dir()


# --- a restarted writer that got the same pid (pid 1 in a container) ------------------------------------


def _earlier_incarnation_of_this_pid():
    """An owner token with our pid but another start time: a previous process that had our pid."""
    token = _fs.owner_token()
    assert "." in token, "this platform has no process start times"
    pid, start = token.split(".")
    return f"{pid}.{int(start) + 1}"


def test_leftover_of_an_earlier_process_with_our_pid_is_an_orphan(tmp_path):
    store = LocalStore(tmp_path)
    stale = tmp_path / f"{TMP_PREFIX}{_earlier_incarnation_of_this_pid()}-abcd-model.keras"
    live = tmp_path / f"{TMP_PREFIX}{_fs.owner_token()}-abcd-model.keras"
    stale.write_bytes(b"half")
    live.write_bytes(b"in progress")
    assert store.orphans() == [stale]


def test_pending_commit_of_an_earlier_process_with_our_pid_is_rolled_forward(tmp_path):
    store = LocalStore(tmp_path)
    commit(store, "file", "model.keras", V1)
    m2 = commit(FailingStore(tmp_path / "scratch", "never"), "file", "model.keras", V2)
    # The state a kill -9 between the data rename and the manifest rename leaves behind:
    shutil.copyfile(tmp_path / "scratch" / "model.keras", tmp_path / "model.keras")
    (store.index / f"model.keras{PENDING}{_earlier_incarnation_of_this_pid()}").write_bytes(m2.to_json())
    assert store.recover().rolled_forward == ["model.keras"]
    store.verify(listed(store)[0])


def test_deleting_marker_of_a_live_writer_is_not_an_orphan(tmp_path):
    store = LocalStore(tmp_path)
    store.index.mkdir()
    live = store.index / f"model.keras{DELETING}-{_fs.owner_token()}"
    stale = store.index / f"other.keras{DELETING}-{_earlier_incarnation_of_this_pid()}"
    live.write_bytes(b"{}")
    stale.write_bytes(b"{}")
    assert store.orphans() == [stale]


def test_verify_checks_sha256_digests_of_keepbest_0_1_manifests(tmp_path):
    import hashlib

    store = LocalStore(tmp_path)
    committed = commit_dir(store, "ckpt-1", {"a.bin": b"12345"})
    old = committed.with_files((FileEntry("a.bin", 5, hashlib.sha256(b"12345").hexdigest(), "sha256"),))
    store.verify(old)
    (tmp_path / "ckpt-1" / "a.bin").write_bytes(b"12346")
    with pytest.raises(CorruptCheckpointError, match=r"a.bin does not match its manifest.*sha256="):
        store.verify(old)


def test_verify_names_a_truncated_file(tmp_path):
    store = LocalStore(tmp_path)
    committed = commit_file(store, "m.keras", b"x" * (20 << 20))
    with open(tmp_path / "m.keras", "r+b") as f:
        f.truncate(10 << 20)
    with pytest.raises(CorruptCheckpointError, match=rf"file {tmp_path}/m.keras does not match.*size=10485760"):
        store.verify(committed)


def test_replacing_is_true_only_while_a_live_writer_holds_a_pending_intent(tmp_path):
    store = LocalStore(tmp_path)
    (tmp_path / INDEX_DIR).mkdir()
    assert not store.replacing("a.keras")
    pending = tmp_path / INDEX_DIR / f"a.keras{PENDING}{_fs.owner_token()}"
    pending.write_text("{}")
    assert store.replacing("a.keras") and not store.replacing("b.keras")
    pending.rename(tmp_path / INDEX_DIR / f"a.keras{PENDING}999999999.1")  # its writer is dead: an orphan
    assert not store.replacing("a.keras")


def test_orphaned_temp_files_of_sidecar_records_are_cleaned(tmp_path):
    store = LocalStore(tmp_path)
    records = tmp_path / INDEX_DIR / "evaluations" / "eval"
    records.mkdir(parents=True)
    dead = records / f"{TMP_PREFIX}999999999.1-abcd-ckpt-1.json"
    live = records / f"{TMP_PREFIX}{_fs.owner_token()}-abcd-ckpt-2.json"
    dead.write_text("{")
    live.write_text("{")
    store.recover()
    assert not dead.exists() and live.exists()
