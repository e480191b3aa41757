"""Tensors to and from bytes in the safetensors format, encoded and decoded here (no file I/O).

The format is an 8-byte little-endian header length, a JSON header
(``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}``)
and the raw little-endian tensor bytes. Files are interchangeable with the
``safetensors`` package. Decoding validates the whole header before touching
data (sizes, offsets, dtypes, no overlaps, no gaps), returns arrays that view
the buffer it is given (a memory map, from the store) and never executes
anything. Writing and reading files is the store's business.

Example:
    >>> import numpy as np
    >>> data = encode({"w": np.arange(3, dtype=np.float32)}).to_bytes()
    >>> decode(data)["w"].tolist()
    [0.0, 1.0, 2.0]
"""

from __future__ import annotations

import json
import math
import posixpath
import re
import struct
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from keepbest import _digest
from keepbest.errors import CorruptCheckpointError

# Headers larger than this are not something keepbest wrote; refusing them
# avoids allocating whatever a damaged length field claims.
MAX_HEADER_BYTES = 100 * 1024 * 1024
_PARALLEL_HASH_BYTES = 4 << 20  # below this a hashing thread costs more than it saves

_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
try:  # bfloat16 and float8 arrive as ml_dtypes types (JAX and Keras depend on it)
    import ml_dtypes

    _DTYPES.update({
        "BF16": np.dtype(ml_dtypes.bfloat16),
        "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
        "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    })
except ImportError:  # pragma: no cover - numpy-only installs have no such arrays
    pass
_CODES = {dt: code for code, dt in _DTYPES.items()}
_NEEDS_ML_DTYPES = ("BF16", "F8_E4M3", "F8_E5M2")


def dtype_code(dtype: np.dtype[Any]) -> str:
    code = _CODES.get(np.dtype(dtype).newbyteorder("<")) or _CODES.get(np.dtype(dtype))
    if code is None:
        raise TypeError(
            f"Cannot store a tensor of dtype {dtype} in safetensors. Supported: "
            f"{', '.join(str(d) for d in _CODES)}. Received: dtype={dtype}"
        )
    return code


def numpy_dtype(code: str) -> np.dtype[Any]:
    """The NumPy dtype of safetensors dtype ``code`` (``F32`` -> float32); a header :func:`parse_header`
    accepted has only known codes."""
    return _DTYPES[code]


def _header(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None) -> tuple[bytes, list[np.ndarray]]:
    doc: dict[str, Any] = {}
    if metadata:
        doc["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays = []
    offset = 0
    for name in sorted(tensors):
        if name == "__metadata__":
            raise ValueError("A tensor cannot be named '__metadata__'. Rename it. Received: name='__metadata__'")
        arr = np.asarray(tensors[name])
        code = dtype_code(arr.dtype)
        arr = np.asarray(arr, dtype=_DTYPES[code])
        if not arr.flags.c_contiguous:  # (np.ascontiguousarray would turn a scalar into shape (1,))
            arr = arr.copy(order="C")
        doc[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, arrays


SHARDS_KEY = "keepbest.shards"
GROUPS_KEY = "keepbest.groups"
"""Metadata of a main file: JSON ``{label: [tensor names]}`` (e.g. ``trainable``, ``frozen``) for its tensors and its
shards' (what ``keepbest show`` prints)."""
PIECES_KEY = "keepbest.pieces"
"""Metadata of a file saved by many processes: JSON ``{path: whole shape}`` of the variables stored as pieces
(each piece named by the slice of the whole it covers, ``dense/kernel[0:4,0:8]``), put together on reading."""
_PIECE = re.compile(r"^(?P<path>.+)\[(?P<slices>\d+:\d+(?:,\d+:\d+)*)\]$")
SHARD_MIN_BYTES = 1 << 20  # a tensor this large gets a shard file of its own group
SHARD_MAX_BYTES = 64 << 20  # a shard is cut here, so one changed tensor rewrites at most this much more


@dataclass
class Encoded:
    """One safetensors file as the pieces of memory it is made of (header first)."""

    pieces: list[memoryview]

    @property
    def size(self) -> int:
        return sum(p.nbytes for p in self.pieces)

    def digest(self) -> str:
        h = _digest.new(threads=self.size >= _PARALLEL_HASH_BYTES)
        for piece in self.pieces:
            h.update(piece)
        return str(h.hexdigest())

    def to_bytes(self) -> bytes:
        return b"".join(bytes(p) for p in self.pieces)


def encode(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> Encoded:
    """The bytes of a safetensors file, without copying the arrays (they must not change meanwhile)."""
    head, arrays = _header(tensors, metadata)
    return Encoded([memoryview(head)] + [arr.reshape(-1).view(np.uint8).data for arr in arrays if arr.size])


def plan_shards(tensors: Mapping[str, np.ndarray], groups: Mapping[str, str] | None = None, *,
                min_bytes: int = SHARD_MIN_BYTES,
                max_bytes: int = SHARD_MAX_BYTES) -> tuple[list[str], list[list[str]]]:
    """Splits tensor names into the main file's and shard files' (for dedup of unchanged tensors).

    Tensors under ``min_bytes`` stay in the main file. Larger ones, in order,
    fill shards of at most ``max_bytes`` (one tensor may exceed it alone); a
    new shard starts where the group changes (``groups``: name -> label, e.g.
    frozen or trainable), so a shard of frozen weights stays byte-identical
    from one save to the next.
    """
    main: list[str] = []
    shards: list[list[str]] = []
    current_group, current_bytes = None, 0
    for name, arr in tensors.items():
        nbytes = int(np.asarray(arr).nbytes)
        if nbytes < min_bytes:
            main.append(name)
            continue
        group = (groups or {}).get(name, "")
        if not shards or group != current_group or current_bytes + nbytes > max_bytes:
            shards.append([])
            current_group, current_bytes = group, 0
        shards[-1].append(name)
        current_bytes += nbytes
    return main, shards


def shard_name(fname: str, index: int) -> str:
    """``model.safetensors`` -> ``model-00001.safetensors``."""
    stem = fname[: -len(".safetensors")] if fname.endswith(".safetensors") else fname
    return f"{stem}-{index:05d}.safetensors"


Where = Callable[[str], str]


def decode_header(buf: Any, where: str = "<buffer>") -> tuple[dict[str, Any], dict[str, str], int]:
    """Validated tensor entries, metadata and the byte offset where data starts, for the file in ``buf``.

    ``where`` names the file in errors. Only the header's bytes are read
    (``buf`` may be a memory map of a large file).
    """
    view = memoryview(buf)
    file_size = view.nbytes
    length = header_length(bytes(view[:8]), file_size, where)
    entries, metadata = parse_header(bytes(view[8 : 8 + length]), file_size, where)
    return entries, metadata, 8 + length


def header_length(first: bytes, file_size: int, where: str = "<buffer>") -> int:
    """The JSON header's length from the first 8 bytes of a file of ``file_size`` bytes (checked against it)."""
    if file_size < 8 or len(first) < 8:
        raise _corrupt(where, "the file is shorter than the 8-byte header length", f"size={file_size}")
    (length,) = struct.unpack("<Q", first[:8])
    if length > MAX_HEADER_BYTES or 8 + length > file_size:
        raise _corrupt(where, "the header length is larger than the file (truncated or damaged)",
                       f"header_length={length} file_size={file_size}")
    return int(length)


def parse_header(raw: bytes, file_size: int, where: str = "<buffer>") -> tuple[dict[str, Any], dict[str, str]]:
    """Validated tensor entries and metadata of the JSON header ``raw`` of a file of ``file_size`` bytes.

    Reading a header alone (8 bytes, then ``raw``) tells what a file holds
    without touching its data.
    """
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=lambda c: math.nan)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _corrupt(where, f"the header is not valid JSON ({e})", f"header={raw[:80]!r}") from None
    if not isinstance(doc, dict):
        raise _corrupt(where, "the header is not a JSON object", f"header={raw[:80]!r}")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(where, "__metadata__ must map strings to strings", f"__metadata__={metadata!r:.80}")
    data_len = file_size - 8 - len(raw)
    spans = []
    for name, info in doc.items():
        _check_entry(where, name, info, data_len)
        spans.append((info["data_offsets"][0], info["data_offsets"][1], name))
    spans.sort()
    end = 0
    for begin, stop, name in spans:
        if begin != end:
            raise _corrupt(where, f"tensor '{name}' overlaps another or leaves a gap", f"data_offsets={[begin, stop]}")
        end = stop
    if end != data_len:
        raise _corrupt(where, "the tensors do not cover the data exactly (truncated or extra bytes)",
                       f"data_bytes={data_len} described={end}")
    return doc, metadata


def _check_entry(path: str, name: str, info: Any, data_len: int) -> None:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise _corrupt(path, f"tensor '{name}' needs exactly dtype, shape and data_offsets", f"{name}={info!r:.120}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype in _NEEDS_ML_DTYPES and dtype not in _DTYPES:
        raise TypeError(f"Cannot read tensor '{name}' of {path}: its dtype {dtype} needs the ml_dtypes package, "
                        f"which is not installed. Install it: pip install ml_dtypes. Received: dtype={dtype!r}")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise _corrupt(path, f"tensor '{name}' has an unknown dtype", f"dtype={dtype!r}")
    ints_ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in [*shape, *offsets]) \
        if isinstance(shape, list) and isinstance(offsets, list) else False
    if not ints_ok or len(offsets) != 2:
        raise _corrupt(path, f"tensor '{name}' has a malformed shape or data_offsets",
                       f"shape={shape!r:.80} data_offsets={offsets!r:.80}")
    begin, stop = offsets
    nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
    if stop > data_len or begin > stop or stop - begin != nbytes:
        raise _corrupt(path, f"tensor '{name}' claims bytes the file does not hold",
                       f"shape={shape} dtype={dtype} data_offsets={offsets} data_bytes={data_len}")


def decode(buf: Any, where: str = "<buffer>") -> dict[str, np.ndarray]:
    """The tensors of one safetensors file held in ``buf`` (arrays view ``buf``; shards are not followed)."""
    entries, _meta, start = decode_header(buf, where)
    return _map(buf, entries, start)


def load(open_buffer: Callable[[str], Any], rel: str, where: Where = str) -> dict[str, np.ndarray]:
    """All tensors of file ``rel`` and of the shard files its metadata lists beside it.

    ``open_buffer(rel)`` gives a file's bytes (a memory map from the store);
    ``where(rel)`` names a file in errors. The arrays view those buffers.
    """
    buf = open_buffer(rel)
    entries, meta, start = decode_header(buf, where(rel))
    out = _map(buf, entries, start)
    for shard in _shards(rel, meta, where):
        try:
            s_buf = open_buffer(shard)
        except FileNotFoundError:
            raise _corrupt(where(rel), f"shard file {posixpath.basename(shard)} is missing",
                           f"{SHARDS_KEY}={meta[SHARDS_KEY]!r:.120}") from None
        s_entries, _meta, s_start = decode_header(s_buf, where(shard))
        clash = sorted(set(s_entries) & set(out))
        if clash:
            raise _corrupt(where(shard), f"tensor '{clash[0]}' is stored twice (shards overlap)", f"names={clash[:5]}")
        out.update(_map(s_buf, s_entries, s_start))
    if PIECES_KEY in meta:
        out = assemble(out, _pieces(rel, meta, where), where(rel))
    return out


def _pieces(rel: str, meta: Mapping[str, str], where: Where) -> dict[str, list[int]]:
    try:
        doc = json.loads(meta[PIECES_KEY])
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or not all(
            isinstance(s, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in s)
            for s in doc.values()):
        raise _corrupt(where(rel), f"'{PIECES_KEY}' must map variable paths to shapes",
                       f"{PIECES_KEY}={meta[PIECES_KEY]!r:.120}")
    return doc


def shards_of(metadata: Mapping[str, str], rel: str, where: Where = str) -> list[str]:
    """The shard files (relative, like ``rel``) that the metadata of file ``rel`` lists."""
    return _shards(rel, metadata, where)


def _shards(rel: str, meta: Mapping[str, str], where: Where) -> list[str]:
    if SHARDS_KEY not in meta:
        return []
    try:
        names = json.loads(meta[SHARDS_KEY])
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(
            isinstance(n, str) and n.endswith(".safetensors") and "/" not in n and "\\" not in n
            and n not in ("", ".", "..") for n in names):
        raise _corrupt(where(rel), f"'{SHARDS_KEY}' must list shard file names in the same folder",
                       f"{SHARDS_KEY}={meta[SHARDS_KEY]!r:.120}")
    folder = posixpath.dirname(rel)
    return [posixpath.join(folder, n) for n in names]


def _map(buf: Any, entries: Mapping[str, Any], start: int) -> dict[str, np.ndarray]:
    out = {}
    for name, info in entries.items():
        begin, stop = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        count = (stop - begin) // dtype.itemsize
        out[name] = np.frombuffer(buf, dtype=dtype, count=count, offset=start + begin).reshape(info["shape"])
    return out


def _corrupt(path: str, why: str, received: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"Cannot read tensors from {path}: {why}. The file is damaged or not a safetensors "
        f"file; load another checkpoint. Received: {received}"
    )


def piece_name(path: str, index: Any) -> str:
    """The tensor name of the piece ``index`` (``(start, stop)`` per dimension) of variable ``path``."""
    return f"{path}[{','.join(f'{a}:{b}' for a, b in index)}]"


def assemble(tensors: dict[str, np.ndarray], pieces: Mapping[str, Any], where: str) -> dict[str, np.ndarray]:
    """``tensors`` with the pieces of each variable in ``pieces`` (``{path: whole shape}``) put together."""
    found: dict[str, list[tuple[str, tuple[tuple[int, int], ...]]]] = {}
    for name in tensors:
        m = _PIECE.match(name)
        if m and m["path"] in pieces:
            index = tuple(tuple(int(x) for x in s.split(":")) for s in m["slices"].split(","))
            found.setdefault(m["path"], []).append((name, index))  # type: ignore[arg-type]
    used = {name for parts in found.values() for name, _ in parts}
    out = {k: v for k, v in tensors.items() if k not in used}
    for path, shape in pieces.items():
        parts = found.get(path, [])
        if not parts:
            raise _corrupt(where, f"variable '{path}' is listed as saved in pieces, but no piece of it is stored",
                           f"{PIECES_KEY} lists {path}")
        first = tensors[parts[0][0]]
        whole = np.empty(tuple(shape), first.dtype)
        covered = np.zeros(tuple(shape), np.uint8)
        for name, index in parts:
            piece = tensors[name]
            if len(index) != len(shape) or any(not 0 <= a <= b <= n for (a, b), n in zip(index, shape)) \
                    or piece.shape != tuple(b - a for a, b in index) or piece.dtype != first.dtype:
                raise _corrupt(where, f"piece '{name}' does not fit variable '{path}' of shape {list(shape)}",
                               f"shape={list(piece.shape)}")
            region = tuple(slice(a, b) for a, b in index)
            whole[region] = piece
            covered[region] += 1
        if not (covered == 1).all():
            raise _corrupt(where, f"the pieces of variable '{path}' do not cover it exactly once "
                           f"({int((covered == 0).sum())} elements missing, {int((covered > 1).sum())} twice)",
                           f"pieces={[n for n, _ in parts][:5]}")
        out[path] = whole
    return out
