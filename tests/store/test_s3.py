"""The storage contract on S3 (moto's server on 127.0.0.1), and what only the object-store backend does."""

from __future__ import annotations

import pytest

from keepbest import store as stores

from .contract import StoreContract

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
