"""``keepbest ls | verify | gc | promote`` on an ``s3://`` URL (moto on 127.0.0.1, reached through
AWS_ENDPOINT_URL only), run as users run them: real subprocesses."""

from __future__ import annotations

import json

import numpy as np
import pytest

from keepbest import CheckpointManager, KeepBest, KeepLast, Monitor
from keepbest import store as stores

from .test_cli import keepbest

pytest.importorskip("s3fs", reason="keepbest[s3] is not installed")


@pytest.fixture
def run_url(s3):
    url = s3.url("cli")
    mgr = CheckpointManager(url, monitor=Monitor("val_loss", "min"), keep=[KeepLast(2), KeepBest(1)])
    for epoch, loss in enumerate([3.0, 1.0, 2.0, 4.0], start=1):
        mgr.save(epoch * 10, {"w": np.full(4, epoch, np.float32)}, metrics={"val_loss": loss}, epoch=epoch)
    return url


def test_ls_lists_the_checkpoints_in_the_bucket_with_the_best_marked(run_url):
    result = keepbest("ls", "--json", run_url)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["epoch"], r["best"]) for r in rows] == [(2, True), (3, False), (4, False)]


def test_verify_names_the_object_whose_bytes_changed(run_url, s3):
    key = next(k for k in s3.keys(run_url) if k.startswith("ckpt-000000030/") and k.endswith(".safetensors"))
    prefix = run_url.split("s3://kbest/")[1]
    body = bytearray(s3.client().get_object(Bucket="kbest", Key=f"{prefix}/{key}")["Body"].read())
    body[-1] ^= 0xFF
    s3.client().put_object(Bucket="kbest", Key=f"{prefix}/{key}", Body=bytes(body))
    result = keepbest("verify", run_url)
    assert result.returncode == 1
    assert "CORRUPT ckpt-000000030" in result.stdout and f"{run_url}/{key} does not match" in result.stdout


def test_gc_removes_what_a_dead_writer_left_in_the_bucket(run_url, s3, dead_token):
    store = stores.open(run_url)
    from keepbest.store import _names

    lock = f".keepbest/{_names.commit_lock('ckpt-000000050')}"
    store.bucket.put(lock, json.dumps({"owner": dead_token, "name": "ckpt-000000050", "layout": "dir",
                                       "created": 0.0, "intent": None}).encode())
    store.bucket.put("ckpt-000000050/state.safetensors", b"half")
    dry = keepbest("gc", "--dry-run", run_url)
    assert dry.returncode == 0 and f"would remove {run_url}/{lock}" in dry.stdout
    result = keepbest("gc", run_url)
    assert result.returncode == 0, result.stderr
    assert not any(k.startswith("ckpt-000000050") or "committing" in k for k in s3.keys(run_url))
    assert keepbest("gc", "--dry-run", run_url).stdout.strip() == "nothing to clean"


def test_promote_sets_an_alias_that_retention_then_keeps(run_url):
    result = keepbest("promote", run_url, "v2", "--alias", "production")
    assert result.returncode == 0, result.stderr
    mgr = CheckpointManager(run_url, monitor=Monitor("val_loss", "min"), keep=[KeepLast(1)])
    mgr.save(50, {"w": np.zeros(4, np.float32)}, metrics={"val_loss": 9.0}, epoch=5)
    rows = json.loads(keepbest("ls", "--json", run_url).stdout)
    assert [(r["epoch"], "production" in r["aliases"]) for r in rows if r["epoch"] == 3] == [(3, True)]
