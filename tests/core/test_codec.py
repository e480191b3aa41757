"""keepbest.codec: safetensors written and read here, interchangeable with the `safetensors` package."""

import json
import re
import struct

import blake3
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keepbest import codec
from keepbest.codec import dtype_code
from keepbest.errors import CorruptCheckpointError

FUZZ = settings(max_examples=400, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
    "BOOL": np.bool_,
    "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


def sample(dtype, shape=(2, 3)):
    n = int(np.prod(shape))
    if np.dtype(dtype) == np.bool_:
        return (np.arange(n) % 3 == 0).reshape(shape)
    return (np.arange(n) - n // 2).astype(np.float64).astype(dtype).reshape(shape)


def assert_same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# The codec encodes and decodes bytes; files are the store's. These adapters keep the tests about files.
def write_file(path, tensors, metadata=None):
    data = codec.encode(tensors, metadata).to_bytes()
    path.write_bytes(data)
    return len(data), blake3.blake3(data).hexdigest()


def read_file(path):
    return codec.load(lambda rel: (path.parent / rel).read_bytes(), path.name, lambda rel: str(path.parent / rel))


def read_header(path):
    return codec.decode_header(path.read_bytes(), str(path))


def raw_file(path, header, data=b""):
    """Writes a safetensors file by hand: 8-byte length, header bytes (or a JSON-able header), data."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)
    return path


def corrupt(path):
    """pytest.raises for a CorruptCheckpointError that names ``path``."""
    return pytest.raises(CorruptCheckpointError, match=re.escape(f"Cannot read tensors from {path}:"))


# --- round trip ------------------------------------------------------------------------------


@pytest.mark.parametrize("code", sorted(DTYPES))
def test_round_trip_preserves_every_supported_dtype(tmp_path, code):
    arr = sample(DTYPES[code])
    write_file(tmp_path / "t.safetensors", {"t": arr})
    out = read_file(tmp_path / "t.safetensors")["t"]
    assert_same(out, arr)


@pytest.mark.parametrize("code", sorted(DTYPES))
def test_write_records_the_safetensors_dtype_code(tmp_path, code):
    write_file(tmp_path / "t.safetensors", {"t": sample(DTYPES[code])})
    entries, _meta, _start = read_header(tmp_path / "t.safetensors")
    assert entries["t"]["dtype"] == code


def test_round_trip_keeps_scalar_shape(tmp_path):
    write_file(tmp_path / "t.safetensors", {"s": np.float32(2.5), "i": np.array(7, np.int64)})
    out = read_file(tmp_path / "t.safetensors")
    assert (out["s"].shape, out["s"].item(), out["i"].shape, out["i"].item()) == ((), 2.5, (), 7)


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4, 2)])
def test_round_trip_keeps_empty_tensors(tmp_path, shape):
    write_file(tmp_path / "t.safetensors", {"a": np.ones(3, np.float32), "e": np.zeros(shape, np.float32),
                                            "z": np.arange(2, dtype=np.int8)})
    out = read_file(tmp_path / "t.safetensors")
    assert out["e"].shape == shape and out["a"].tolist() == [1, 1, 1] and out["z"].tolist() == [0, 1]


def test_round_trip_of_only_empty_tensors(tmp_path):
    write_file(tmp_path / "t.safetensors", {"e": np.zeros((0, 2), np.float64)})
    assert read_file(tmp_path / "t.safetensors")["e"].shape == (0, 2)


def test_round_trip_of_no_tensors_is_empty(tmp_path):
    write_file(tmp_path / "t.safetensors", {})
    assert read_file(tmp_path / "t.safetensors") == {}


@pytest.mark.parametrize(
    "view",
    [
        lambda a: a[:, ::2],
        lambda a: a.T,
        lambda a: np.asfortranarray(a),
        lambda a: a[::-1],
    ],
    ids=["strided", "transposed", "fortran", "reversed"],
)
def test_round_trip_of_non_contiguous_input_stores_its_values(tmp_path, view):
    arr = view(np.arange(24, dtype=np.float32).reshape(4, 6))
    write_file(tmp_path / "t.safetensors", {"t": arr})
    np.testing.assert_array_equal(read_file(tmp_path / "t.safetensors")["t"], arr)


def test_round_trip_converts_big_endian_to_little_endian(tmp_path):
    arr = np.arange(5, dtype=">i4")
    write_file(tmp_path / "t.safetensors", {"t": arr})
    out = read_file(tmp_path / "t.safetensors")["t"]
    assert out.dtype == np.dtype("<i4") and out.tolist() == [0, 1, 2, 3, 4]


def test_round_trip_keeps_metadata(tmp_path):
    write_file(tmp_path / "t.safetensors", {"t": np.zeros(1)}, metadata={"format": "np", "epoch": 3})
    assert read_header(tmp_path / "t.safetensors")[1] == {"format": "np", "epoch": "3"}


def test_read_returns_read_only_arrays(tmp_path):
    write_file(tmp_path / "t.safetensors", {"t": np.zeros(3)})
    assert read_file(tmp_path / "t.safetensors")["t"].flags.writeable is False


def test_write_returns_size_and_blake3_of_the_file_bytes(tmp_path):
    path = tmp_path / "t.safetensors"
    size, digest = write_file(path, {"a": sample(np.float32), "b": np.float64(1.0), "e": np.zeros(0)},
                              metadata={"k": "v"})
    data = path.read_bytes()
    assert (size, digest) == (len(data), blake3.blake3(data).hexdigest())


def test_write_aligns_tensor_data_to_eight_bytes(tmp_path):
    write_file(tmp_path / "t.safetensors", {"abc": np.zeros(1, np.int8)})
    assert read_header(tmp_path / "t.safetensors")[2] % 8 == 0


@pytest.mark.parametrize("dtype", [np.complex64, object, "U3", "datetime64[s]"])
def test_write_rejects_unsupported_dtypes(tmp_path, dtype):
    with pytest.raises(TypeError, match="Cannot store a tensor of dtype .* in safetensors"):
        write_file(tmp_path / "t.safetensors", {"t": np.zeros(2, dtype=dtype)})


def test_write_rejects_tensor_named_metadata(tmp_path):
    with pytest.raises(ValueError, match="A tensor cannot be named '__metadata__'"):
        write_file(tmp_path / "t.safetensors", {"__metadata__": np.zeros(1)})


def test_dtype_code_accepts_big_endian_dtypes():
    assert dtype_code(np.dtype(">f8")) == "F64"


# --- interop with the safetensors package --------------------------------------------------------

INTEROP = ["F64", "F32", "F16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL"]


def test_safetensors_package_reads_what_we_write(tmp_path):
    tensors = {code: sample(DTYPES[code], (3, 2)) for code in INTEROP}
    tensors["scalar"] = np.array(1.5, np.float32)
    tensors["empty"] = np.zeros((0, 3), np.int32)
    write_file(tmp_path / "ours.safetensors", tensors, metadata={"k": "v"})
    theirs = safetensors.numpy.load_file(tmp_path / "ours.safetensors")
    assert sorted(theirs) == sorted(tensors)
    for name, arr in tensors.items():
        assert_same(theirs[name], arr)


def test_safetensors_package_reads_our_metadata(tmp_path):
    write_file(tmp_path / "ours.safetensors", {"t": np.zeros(1)}, metadata={"k": "v"})
    with safetensors.safe_open(tmp_path / "ours.safetensors", "np") as f:
        assert f.metadata() == {"k": "v"}


def test_we_read_what_the_safetensors_package_writes(tmp_path):
    tensors = {code: sample(DTYPES[code], (2, 5)) for code in INTEROP}
    tensors["scalar"] = np.array(-3, np.int16)
    tensors["empty"] = np.zeros((4, 0), np.float64)
    safetensors.numpy.save_file(tensors, tmp_path / "theirs.safetensors", metadata={"who": "them"})
    ours = read_file(tmp_path / "theirs.safetensors")
    assert sorted(ours) == sorted(tensors)
    for name, arr in tensors.items():
        assert_same(ours[name], arr)


def test_we_read_metadata_the_safetensors_package_writes(tmp_path):
    safetensors.numpy.save_file({"t": np.zeros(1)}, tmp_path / "theirs.safetensors", metadata={"who": "them"})
    assert read_header(tmp_path / "theirs.safetensors")[1] == {"who": "them"}


# --- corrupt files ------------------------------------------------------------------------------


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def test_read_rejects_a_file_shorter_than_the_length_prefix(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    with corrupt(path):
        read_file(path)


def test_read_rejects_an_empty_file(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match="shorter than the 8-byte header length"):
        read_file(path)


def test_read_rejects_a_file_truncated_inside_the_data(tmp_path):
    path = tmp_path / "t.safetensors"
    write_file(path, {"a": np.arange(10, dtype=np.float32)})
    path.write_bytes(path.read_bytes()[:-4])
    with corrupt(path):
        read_file(path)


def test_read_rejects_a_file_truncated_inside_the_header(tmp_path):
    path = tmp_path / "t.safetensors"
    write_file(path, {"a": np.arange(10, dtype=np.float32)})
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CorruptCheckpointError, match="header length is larger than the file"):
        read_file(path)


@pytest.mark.parametrize("length", [2**63, 2**64 - 1, 200 * 1024 * 1024])
def test_read_rejects_a_header_length_claiming_huge_sizes(tmp_path, length):
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", length) + b"{}")
    with corrupt(path):
        read_header(path)


def test_read_rejects_extra_bytes_after_the_data(tmp_path):
    path = tmp_path / "t.safetensors"
    write_file(path, {"a": np.arange(2, dtype=np.float32)})
    path.write_bytes(path.read_bytes() + b"junk")
    with pytest.raises(CorruptCheckpointError, match="do not cover the data exactly"):
        read_file(path)


def test_read_rejects_overlapping_offsets(tmp_path):
    path = raw_file(tmp_path / "t.safetensors",
                    {"a": F32x2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12))
    with pytest.raises(CorruptCheckpointError, match=re.escape(f"{path}: tensor 'b' overlaps another or leaves a gap")):
        read_file(path)


def test_read_rejects_a_gap_between_tensors(tmp_path):
    path = raw_file(tmp_path / "t.safetensors",
                    {"a": F32x2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}, bytes(20))
    with pytest.raises(CorruptCheckpointError, match=re.escape(f"{path}: tensor 'b' overlaps another or leaves a gap")):
        read_file(path)


@pytest.mark.parametrize(
    ("shape", "offsets"),
    [([3], [0, 8]), ([2, 2], [0, 8]), ([1], [0, 8]), ([2], [0, 16])],
)
def test_read_rejects_offsets_not_matching_shape_and_itemsize(tmp_path, shape, offsets):
    path = raw_file(tmp_path / "t.safetensors", {"a": {"dtype": "F32", "shape": shape, "data_offsets": offsets}},
                    bytes(8))
    with pytest.raises(CorruptCheckpointError, match=re.escape(f"{path}: tensor 'a' claims bytes the file does not hold")):
        read_file(path)


@pytest.mark.parametrize("dtype", ["F128", "f32", "", 7, None])
def test_read_rejects_an_unknown_dtype(tmp_path, dtype):
    path = raw_file(tmp_path / "t.safetensors", {"a": {**F32x2, "dtype": dtype}}, bytes(8))
    with pytest.raises(CorruptCheckpointError, match=re.escape(f"{path}: tensor 'a' has an unknown dtype")):
        read_file(path)


@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}])
def test_read_rejects_a_dtype_that_is_not_a_string(tmp_path, dtype):
    path = raw_file(tmp_path / "t.safetensors", {"a": {**F32x2, "dtype": dtype}}, bytes(8))
    with corrupt(path):
        read_file(path)


@pytest.mark.parametrize(
    "entry",
    [
        {**F32x2, "shape": [2.0]},
        {**F32x2, "shape": [-2]},
        {**F32x2, "shape": [True, True]},
        {**F32x2, "shape": "2"},
        {**F32x2, "data_offsets": [0]},
        {**F32x2, "data_offsets": [0, 8, 8]},
        {**F32x2, "data_offsets": [0, "8"]},
        {"dtype": "F32", "shape": [2]},
        {**F32x2, "extra": 1},
        [0, 8],
    ],
)
def test_read_rejects_malformed_tensor_entries(tmp_path, entry):
    path = raw_file(tmp_path / "t.safetensors", {"a": entry}, bytes(8))
    with pytest.raises(CorruptCheckpointError, match=re.escape(f"{path}: tensor 'a'")):
        read_file(path)


@pytest.mark.parametrize("header", [b"not json", b'{"a": ', b"\xff\xfe\x00\x01"])
def test_read_rejects_a_header_that_is_not_json(tmp_path, header):
    path = raw_file(tmp_path / "t.safetensors", header)
    with pytest.raises(CorruptCheckpointError, match=re.escape(f"{path}: the header is not valid JSON")):
        read_file(path)


@pytest.mark.parametrize("header", [[], 3, "x", None])
def test_read_rejects_a_header_that_is_not_an_object(tmp_path, header):
    path = raw_file(tmp_path / "t.safetensors", header)
    with pytest.raises(CorruptCheckpointError, match=re.escape(f"{path}: the header is not a JSON object")):
        read_file(path)


@pytest.mark.parametrize("metadata", [{"k": 1}, ["k"], "k"])
def test_read_rejects_metadata_that_is_not_string_to_string(tmp_path, metadata):
    path = raw_file(tmp_path / "t.safetensors", {"__metadata__": metadata})
    with pytest.raises(CorruptCheckpointError, match=re.escape(f"{path}: __metadata__ must map strings to strings")):
        read_file(path)


def test_read_rejects_a_deeply_nested_header(tmp_path):
    path = raw_file(tmp_path / "t.safetensors", b"[" * 100_000 + b"]" * 100_000)
    with corrupt(path):
        read_file(path)


# --- fuzzing -------------------------------------------------------------------------------------


def _reads_or_raises_corrupt(path):
    """Any outcome but a dict of arrays or a CorruptCheckpointError naming the file fails the test."""
    result = error = None
    try:
        result = read_file(path)
    except CorruptCheckpointError as e:
        error = e
    if error is not None:
        assert str(path) in str(error)
    else:
        assert isinstance(result, dict) and all(isinstance(v, np.ndarray) for v in result.values())
    return result


@FUZZ
@given(st.binary(max_size=300))
def test_read_of_random_bytes_after_a_valid_length_is_corrupt_or_valid(tmp_path, body):
    split = len(body) // 2
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(struct.pack("<Q", split) + body)
    _reads_or_raises_corrupt(path)


# Scalars and lists of ints only: a list/dict in the dtype position hits the TypeError bug pinned above.
json_scalars = st.none() | st.booleans() | st.integers(-4, 40) | st.floats(allow_nan=False) | st.text(max_size=4)
field_values = json_scalars | st.lists(st.integers(-1, 24) | json_scalars, max_size=3)


@st.composite
def headers(draw):
    """A consistent header with its data length, then sometimes one field, length or metadata perturbed."""
    header, offset = {}, 0
    for i in range(draw(st.integers(0, 3))):
        code = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[code]).itemsize
        header[f"t{i}"] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    data_len = offset
    perturb = draw(st.sampled_from(["none", "field", "entry", "length", "metadata"]))
    if perturb == "field" and header:
        entry = header[draw(st.sampled_from(sorted(header)))]
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
        entry[field] = draw(json_scalars if field == "dtype" else field_values)
    elif perturb == "entry":
        header[draw(st.sampled_from(sorted(header) + ["new"]))] = draw(field_values)
    elif perturb == "length":
        data_len = max(0, offset + draw(st.integers(-3, 3)))
    elif perturb == "metadata":
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=3), st.text(max_size=3)) | field_values)
    return header, data_len


@FUZZ
@given(headers())
def test_read_of_random_header_json_is_corrupt_or_valid(tmp_path, header_and_length):
    header, data_len = header_and_length
    path = raw_file(tmp_path / "fuzz.safetensors", header, bytes(i % 256 for i in range(data_len)))
    result = _reads_or_raises_corrupt(path)
    if result is not None:  # what was read is what the header describes
        assert {k: v.shape for k, v in result.items()} == {
            k: tuple(e["shape"]) for k, e in header.items() if k != "__metadata__"}


@FUZZ
@given(st.dictionaries(st.text(min_size=1, max_size=5).filter(lambda s: s != "__metadata__"),
                       st.sampled_from(sorted(DTYPES)), max_size=4),
       st.data())
def test_read_of_valid_file_with_one_byte_changed_is_corrupt_or_valid(tmp_path, dtypes, data):
    path = tmp_path / "fuzz.safetensors"
    write_file(path, {name: sample(DTYPES[code], (2,)) for name, code in dtypes.items()})
    raw = bytearray(path.read_bytes())
    index = data.draw(st.integers(0, len(raw) - 1))
    raw[index] = data.draw(st.integers(0, 255))
    path.write_bytes(bytes(raw))
    _reads_or_raises_corrupt(path)
