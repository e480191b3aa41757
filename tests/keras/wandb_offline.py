"""Reads what an offline W&B run recorded: its ``run-<id>.wandb`` file, record by record.

wandb 0.31 writes the file from its Go service and ships no Python reader.
The format: a 7-byte header (``:W&B``, 0xBEE1, version 0), then 32 KiB
blocks of chunks, each ``<crc32, length, type>`` (1 full, 2 first, 3 middle,
4 last); each reassembled payload is a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator

from wandb.proto import wandb_internal_pb2

_HEADER = struct.Struct("<4sHB")
_CHUNK = struct.Struct("<IHB")
_BLOCK = 32 * 1024


def records(path: Path) -> Iterator[Any]:
    data = path.read_bytes()
    assert _HEADER.unpack_from(data, 0) == (b":W&B", 0xBEE1, 0), f"not a .wandb file: {path}"
    pos, parts = _HEADER.size, b""
    while pos + _CHUNK.size <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _CHUNK.size:  # the rest of a block is padding
            pos += room
            continue
        crc, length, kind = _CHUNK.unpack_from(data, pos)
        if kind == 0 and length == 0:
            pos += room
            continue
        chunk = data[pos + _CHUNK.size : pos + _CHUNK.size + length]
        pos += _CHUNK.size + length
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad checksum in {path} at {pos}"
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def artifacts(run_dir: Path) -> list[dict[str, Any]]:
    """The artifacts the run logged, in order: name, type, aliases, metadata and files (path -> md5)."""
    (path,) = Path(run_dir).glob("run-*.wandb")
    out = []
    for r in records(path):
        if r.WhichOneof("record_type") == "artifact":
            a = r.artifact
            out.append({"name": a.name, "type": a.type, "aliases": set(a.aliases),
                        "metadata": json.loads(a.metadata) if a.metadata else {},
                        "files": {e.path: e.digest for e in a.manifest.contents}})
    return out


def offline_run(tmp_path: Path, monkeypatch: Any) -> Iterator[Any]:
    """The body of a fixture: a W&B run in offline mode with every W&B folder under ``tmp_path``; each test gets
    a service process of its own, started with its own folders."""
    import wandb

    for var, sub in [("WANDB_DIR", "wandb"), ("WANDB_DATA_DIR", "wandb-data"), ("WANDB_CACHE_DIR", "wandb-cache"),
                     ("WANDB_CONFIG_DIR", "wandb-config")]:
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="keepbest-tests", dir=str(tmp_path / "wandb"))
    yield run
    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()
