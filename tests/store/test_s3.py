"""The storage contract on S3 (moto's server on 127.0.0.1), and what only the object-store backend does."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections import Counter

import pytest

from keepbest import store as stores
from keepbest.errors import CorruptCheckpointError, StorageError
from keepbest.store._object_io import PART

from .contract import V1, V2, StoreContract, commit_dir, commit_file, contents, listed

pytest.importorskip("s3fs", reason="keepbest[s3] is not installed")


def _tamper_with(server):
    def tamper(store, manifest, rel, how):
        m = manifest
        key = store.bucket.key(store.data_key(m.name, m.layout, m.files_under, rel))
        client = server.client()
        if how == "delete":
            client.delete_object(Bucket=store.bucket.bucket, Key=key)
        else:
            data = client.get_object(Bucket=store.bucket.bucket, Key=key)["Body"].read()
            data = data[:-1] + bytes([data[-1] ^ 0xFF]) if how == "flip" else data[:-1]
            client.put_object(Bucket=store.bucket.bucket, Key=key, Body=data)
        return f"s3://{store.bucket.bucket}/{key}"
    return tamper


class TestObjectStore(StoreContract):
    @pytest.fixture
    def store(self, s3):
        return stores.open(s3.url("contract"))

    @pytest.fixture
    def tamper(self, s3):
        return _tamper_with(s3)

    @pytest.fixture
    def put_foreign(self, s3):
        def put(store, name, data):
            s3.client().put_object(Bucket=store.bucket.bucket, Key=store.bucket.key(name), Body=data)
        return put


# --- what only the object-store backend does ------------------------------------------------------------



MIB = 1 << 20


class Requests:
    """Every S3 request the store sends: (operation, its If-* headers), counted by a botocore event hook."""

    def __init__(self, store):
        self.seen: list[tuple[str, dict[str, str]]] = []
        store.bucket._check_conditions()  # the once-per-bucket probe is not part of what is measured
        store.bucket.fs.s3.meta.events.register("before-call.s3", self._hook)

    def _hook(self, params, model, **_):
        headers = {k: v for k, v in params.get("headers", {}).items() if k.lower().startswith("if-")}
        self.seen.append((model.name, headers))

    def take(self):
        out, self.seen = self.seen, []
        return out


@pytest.fixture
def store(s3):
    return stores.open(s3.url("backend"))


def test_a_commit_writes_the_data_first_then_the_manifest_with_one_put_if_none_match(store):
    requests = Requests(store)
    m = commit_dir(store, "ckpt-1", V1)
    ops = requests.take()
    puts = [(op, h) for op, h in ops if op == "PutObject"]
    # lock (create), two data files, then the manifest (create): the commit; the lock goes last.
    assert [h for _op, h in puts] == [{"If-None-Match": "*"}, {}, {}, {"If-None-Match": "*"}]
    assert ops[-1][0] == "DeleteObject" and "If-Match" in ops[-1][1]
    assert not any(op in ("CopyObject", "UploadPartCopy") for op, _ in ops)
    assert listed(store) == [m]


def test_a_re_save_commits_with_if_match_on_the_previous_manifest(store):
    commit_file(store, "best.keras", b"first")
    requests = Requests(store)
    commit_file(store, "best.keras", b"second")
    puts = [h for op, h in requests.take() if op == "PutObject"]
    assert puts[0] == {"If-None-Match": "*"}  # the name's lock
    assert "If-Match" in puts[-1]  # the manifest replaces exactly the one this save read
    assert contents(store, listed(store)[0]) == {"state.bin": b"second"}


def test_requests_to_commit_do_not_grow_with_the_checkpoint_only_its_upload_parts_do(store):
    requests = Requests(store)
    commit_dir(store, "small", {"w.bin": b"x" * 1000})
    small = [op for op, _ in requests.take()]
    commit_dir(store, "large", {"w.bin": bytes(40 * MIB)})  # several parts
    large = [op for op, _ in requests.take()]
    assert large.count("UploadPart") == -(-40 * MIB // PART) > 1
    # The one data PUT of the small checkpoint became one multipart upload; everything else is the same.
    multipart = ("CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload")
    assert Counter(op for op in large if op not in multipart) + Counter({"PutObject": 1}) == Counter(small)


def test_a_second_writer_of_one_name_is_refused_while_the_first_writes_and_nothing_is_lost(store):
    commit_dir(store, "best", V1)
    first = store.stage("best", "dir")
    first.write("state.bin", b"new")
    with pytest.raises(StorageError, match=r"Cannot save checkpoint s3://.*/best: another writer .* is saving it"):
        store.stage("best", "dir")
    assert contents(store, listed(store)[0]) == V1  # the committed one is whole meanwhile
    store.commit(first, listed(store)[0].__class__(name="best", layout="dir", format="bytes", series="s"))
    assert contents(store, listed(store)[0]) == {"state.bin": b"new"}


def test_a_re_saved_folder_writes_new_keys_and_removes_the_old_ones_after_the_commit(store, s3):
    commit_dir(store, "best", V1)
    before = s3.keys(store.url)
    staged = store.stage("best", "dir")
    for rel, data in V2.items():
        staged.write(rel, data)
    assert set(before) <= set(s3.keys(store.url))  # the committed files are untouched while the new ones upload
    assert contents(store, listed(store)[0]) == V1
    m = store.commit(staged, listed(store)[0].__class__(name="best", layout="dir", format="bytes", series="s"))
    assert m.files_under.startswith(".keepbest-gen-")
    assert sorted(s3.keys(store.url)) == sorted(["best/manifest.json"] + [f"best/{m.files_under}/{r}" for r in V2])
    assert contents(store, listed(store)[0]) == V2


def test_reading_a_changed_object_raises_naming_its_url(store, s3):
    m = commit_dir(store, "ckpt", {"state.bin": b"0123456789"})
    key = store.bucket.key("ckpt/state.bin")
    s3.client().put_object(Bucket=store.bucket.bucket, Key=key, Body=b"0123456780")
    with pytest.raises(CorruptCheckpointError, match=rf"file s3://kbest/{key} does not match its manifest"):
        store.reader(m).buffer("state.bin")


def test_a_bucket_that_does_not_exist_is_a_storage_error_naming_it(s3):
    missing = stores.open("s3://no-such-bucket-here/run")
    with pytest.raises(StorageError, match=r"Cannot write s3://no-such-bucket-here/run.*bucket 'no-such-bucket-here'"):
        commit_dir(missing, "ckpt", V1)


# --- recovery of dead writers -------------------------------------------------------------------------


def _dead_lock(store, name, layout, owner, intent=None, replaces=None):
    from keepbest.store import _names

    doc = {"owner": owner, "name": name, "layout": layout, "created": 0.0,
           "intent": None if intent is None else json.loads(intent.to_json()), "replaces": replaces}
    store.bucket.put(f".keepbest/{_names.commit_lock(name)}", json.dumps(doc).encode())


def test_gc_rolls_forward_a_keras_file_whose_upload_completed_before_its_writer_died(store, dead_token):
    old = commit_file(store, "best.keras", b"old")
    new = old.__class__(**{**old.__dict__, "files": (old.files[0].__class__("best.keras", 3, _blake3(b"new")),),
                           "created": old.created + 1})
    _dead_lock(store, "best.keras", "file", dead_token, intent=new)
    store.bucket.put("best.keras", b"new")  # the data was replaced, the manifest not yet
    listing = store.list()  # same size: only the lock's intent tells that the object may be the new save
    assert listing.manifests == [] and "was being saved again when its writer died" in listing.damaged[0].reason
    report = store.recover()
    assert report.rolled_forward == ["best.keras"]
    (m,) = listed(store)
    store.verify(m)
    assert contents(store, m) == {"state.bin": b"new"} and store.orphans().dead == []


def test_an_intent_whose_upload_never_completed_lists_the_previous_save_and_gc_rolls_it_back(store, dead_token):
    old = commit_file(store, "best.keras", b"old")
    new = old.__class__(**{**old.__dict__, "files": (old.files[0].__class__("best.keras", 3, _blake3(b"new")),)})
    _dead_lock(store, "best.keras", "file", dead_token, intent=new, replaces=store.bucket.head("best.keras")[1])
    assert listed(store) == [old]  # the object still has the ETag the killed writer was about to replace
    report = store.recover()
    assert report.rolled_back == ["best.keras"] and listed(store) == [old]
    assert contents(store, old) == {"state.bin": b"old"}


def test_gc_removes_what_a_dead_writer_uploaded_and_aborts_its_multipart_upload(store, s3, dead_token):
    _dead_lock(store, "ckpt-7", "dir", dead_token)
    store.bucket.put("ckpt-7/state.bin", b"half of a checkpoint")
    store.bucket.call("create_multipart_upload", "ckpt-7/big.bin", "upload")
    assert listed(store) == []  # never visible: no manifest
    assert len(store.orphans().dead) == 2  # the lock, and the upload it leaves
    store.recover()
    assert s3.keys(store.url) == [] and s3.uploads(store.url) == [] and store.orphans().dead == []


def test_gc_leaves_the_lock_and_uploads_of_a_writer_on_another_host(store, s3, dead_token):
    other_host = "ffffffff" + dead_token[8:]
    _dead_lock(store, "ckpt-7", "dir", other_host)
    store.bucket.put("ckpt-7/state.bin", b"being written")
    found = store.orphans()
    assert found.dead == [] and len(found.undecided) == 1
    assert store.recover().undecided == found.undecided
    assert "ckpt-7/state.bin" in s3.keys(store.url)


def test_gc_never_touches_objects_keepbest_did_not_write(store, s3, dead_token):
    store.bucket.put("notes.txt", b"mine")
    store.bucket.put("data/train.csv", b"a,b")
    commit_dir(store, "ckpt-1", V1)
    assert store.orphans().dead == []
    store.recover()
    assert {"notes.txt", "data/train.csv"} <= set(s3.keys(store.url))


def test_a_writer_that_died_holding_a_lock_does_not_block_the_next_save_on_this_host(store, dead_token):
    commit_file(store, "best.keras", b"old")
    _dead_lock(store, "best.keras", "file", dead_token)
    commit_file(store, "best.keras", b"new")
    assert contents(store, listed(store)[0]) == {"state.bin": b"new"}


def _blake3(data):
    from keepbest import _digest

    return _digest.of_bytes(data)


# --- two processes, one checkpoint -----------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import os, sys, time
    from keepbest import store as stores
    from keepbest.errors import StorageError
    from keepbest.manifest import Manifest
    url, go, me = sys.argv[1:4]
    store = stores.open(url)
    store.bucket._check_conditions()
    while not os.path.exists(go):
        time.sleep(0.001)
    try:
        staged = store.stage("best", "dir")
        staged.write("state.bin", me.encode() * (24 << 20))
        store.commit(staged, Manifest("best", "dir", "bytes", "s"))
        print("committed")
    except StorageError as e:
        print("refused:", e)
""")


def test_two_processes_committing_one_checkpoint_at_once_one_wins_the_other_is_refused(store, s3, tmp_path):
    commit_dir(store, "best", {"state.bin": b"previous"})
    go = tmp_path / "go"
    children = [subprocess.Popen([sys.executable, "-c", WRITER, store.url, str(go), me], stdout=subprocess.PIPE,
                                 text=True) for me in "AB"]
    time.sleep(2.0)  # both have imported and connected
    go.touch()
    outs = [c.communicate(timeout=120)[0] for c in children]
    assert sorted(o.split(":")[0].strip() for o in outs) == ["committed", "refused"], outs
    refused = next(o for o in outs if o.startswith("refused"))
    assert "another writer" in refused and "is saving it" in refused
    winner = "AB"[[o.strip() for o in outs].index("committed")]
    (m,) = listed(store)
    store.verify(m)
    assert store.reader(m).read("state.bin")[:4] == winner.encode() * 4
    assert store.orphans().dead == [] and s3.uploads(store.url) == []



def test_gc_removes_the_conditional_write_probe_of_a_writer_killed_while_checking(store, s3, dead_token):
    store.bucket.put(f".keepbest/.keepbest-probe-{dead_token}-0a1b2c3d", b"probe")
    assert len(store.orphans().dead) == 1
    store.recover()
    assert s3.keys(store.url) == []


def test_gc_removes_the_files_of_a_re_saved_folder_that_a_killed_writer_left(store, s3, dead_token):
    commit_dir(store, "best", V1)
    store.bucket.put("best/.keepbest-gen-0a1b2c3d4e5f/state.bin", b"uploaded, never committed")
    assert store.orphans().dead == [f"{store.url}/best/.keepbest-gen-0a1b2c3d4e5f/state.bin"]
    store.recover()
    assert sorted(s3.keys(store.url)) == sorted(f"best/{rel}" for rel in [*V1, "manifest.json"])


def test_a_store_that_ignores_conditional_writes_is_refused_before_anything_is_committed(s3):
    from tests.s3 import IgnoringConditions

    proxy = IgnoringConditions(s3.endpoint)
    try:
        url = s3.url("unconditional")
        store = stores.open(url, storage_options={"endpoint_url": proxy.endpoint})
        with pytest.raises(StorageError, match=r"Cannot use s3://kbest/unconditional-.*: the server ignores "
                                               r"conditional writes .* Received: s3://"):
            commit_dir(store, "ckpt-1", V1)
        assert s3.keys(url) == []  # neither the probe nor anything of the checkpoint is left
    finally:
        proxy.stop()
