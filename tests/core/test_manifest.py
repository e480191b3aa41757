"""keepbest.manifest: round trip and strict decoding."""

import copy
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keepbest.errors import CorruptCheckpointError
from keepbest.manifest import FORMAT_VERSION, FileEntry, Manifest, MonitorRecord, is_safe_relative_path

SHA = "ab" * 32
FUZZ = settings(max_examples=400, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def full_manifest(**changes):
    fields = dict(
        name="step-000000010",
        layout="dir",
        format="tensors",
        series="ckpt",
        step=10,
        epoch=2,
        batch=5,
        metrics={"val_loss": 0.25, "loss": 1.5},
        monitor=MonitorRecord("val_loss", "min"),
        created=1700000000.125,
        files=(FileEntry("state.safetensors", 123, SHA), FileEntry("sub/meta.json", 0, "0" * 64)),
        versions={"keepbest": "0.1.0", "numpy": "2.0"},
        extra={"note": "hi", "nested": {"a": [1, 2, None]}},
    )
    fields.update(changes)
    return Manifest(**fields)


def valid_doc():
    return json.loads(full_manifest().to_json())


def decode_doc(doc, source="runs/a/manifest.json"):
    return Manifest.from_json(json.dumps(doc).encode("utf-8"), source=source)


# --- round trip --------------------------------------------------------------------------


def test_to_json_from_json_round_trips_every_field():
    m = full_manifest()
    assert Manifest.from_json(m.to_json(), source="x") == m


def test_round_trip_of_minimal_manifest_keeps_optional_fields_none():
    m = Manifest(name="a.keras", layout="file", format="keras", series="s")
    out = Manifest.from_json(m.to_json(), source="x")
    assert (out.step, out.epoch, out.batch, out.monitor) == (None, None, None, None)


@pytest.mark.parametrize("value", [math.inf, -math.inf])
def test_round_trip_keeps_infinite_metric_values(value):
    m = full_manifest(metrics={"val_loss": value})
    assert Manifest.from_json(m.to_json(), source="x").metrics["val_loss"] == value


def test_round_trip_keeps_nan_metric_values():
    m = full_manifest(metrics={"val_loss": math.nan})
    assert math.isnan(Manifest.from_json(m.to_json(), source="x").metrics["val_loss"])


def test_to_json_writes_standard_json_without_nan_literals():
    m = full_manifest(metrics={"a": math.nan, "b": math.inf, "c": -math.inf})
    assert json.loads(m.to_json())["metrics"] == {"a": "nan", "b": "inf", "c": "-inf"}


def test_monitor_value_reads_the_monitored_metric():
    assert full_manifest().monitor_value == 0.25


def test_monitor_value_is_none_without_monitor():
    assert full_manifest(monitor=None).monitor_value is None


# --- strict decoding -----------------------------------------------------------------------


def test_from_json_rejects_invalid_json_naming_the_source():
    with pytest.raises(CorruptCheckpointError, match="Cannot read manifest runs/a/manifest.json: it is not valid JSON"):
        Manifest.from_json(b'{"format": ', source="runs/a/manifest.json")


def test_from_json_rejects_non_utf8_bytes():
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        Manifest.from_json(b"\xff\xfe{}", source="m.json")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_from_json_rejects_non_standard_constants(literal):
    raw = full_manifest().to_json().replace(b'"created": 1700000000.125', f'"created": {literal}'.encode())
    assert literal.encode() in raw
    with pytest.raises(CorruptCheckpointError, match=f"non-standard JSON constant {literal}"):
        Manifest.from_json(raw, source="m.json")


def test_from_json_rejects_a_top_level_that_is_not_an_object():
    with pytest.raises(CorruptCheckpointError, match="top level must be an object"):
        Manifest.from_json(b"[1, 2]", source="m.json")


def _set(doc, dotted, value):
    parts = dotted.split(".")
    target = doc
    for part in parts[:-1]:
        target = target[int(part)] if isinstance(target, list) else target[part]
    last = parts[-1]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return doc


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("format", "something/else", "'format' must be 'keepbest/checkpoint'"),
        ("format_version", "1", "field 'format_version' must be int"),
        ("step", "10", "field 'step' must be int"),
        ("step", True, "field 'step' must be int"),
        ("epoch", 2.0, "field 'epoch' must be int"),
        ("batch", [5], "field 'batch' must be int"),
        ("name", 7, "field 'name' must be str"),
        ("series", None, "field 'series' must be str"),
        ("payload", None, "field 'payload' must be str"),
        ("layout", "zip", r"'layout' must be one of \('file', 'dir'\)"),
        ("created", "yesterday", "field 'created' must be int/float"),
        ("created", False, "field 'created' must be int/float"),
        ("metrics", [], "field 'metrics' must be dict"),
        ("metrics.val_loss", "0.5", "metric 'val_loss' must be a number"),
        ("metrics.val_loss", True, "metric 'val_loss' must be a number"),
        ("metrics.val_loss", None, "metric 'val_loss' must be a number"),
        ("monitor", "val_loss", "field 'monitor' must be dict"),
        ("monitor.mode", "auto", r"monitor mode must be one of \('min', 'max'\)"),
        ("monitor.name", 3, "field 'name' must be str"),
        ("files", {}, "field 'files' must be list"),
        ("files.0", "state.safetensors", "each entry of 'files' must be an object"),
        ("files.0.size", "123", "field 'size' must be int"),
        ("files.0.size", -1, "file 'state.safetensors' has an invalid size or blake3"),
        ("files.0.blake3", "AB" * 32, "invalid size or blake3"),  # upper case is not what we write
        ("files.0.blake3", "ab" * 31, "invalid size or blake3"),
        ("files.0.blake3", "zz" * 32, "invalid size or blake3"),
        ("files.0.sha256", "ab" * 32, "needs exactly one digest"),  # two digests: which one counts?
        ("versions", {"keepbest": 1}, "'versions' values must be strings"),
        ("extra", [], "field 'extra' must be dict"),
    ],
)
def test_from_json_rejects_wrong_field(field, value, match):
    doc = _set(valid_doc(), field, value)
    with pytest.raises(CorruptCheckpointError, match=match):
        decode_doc(doc)


@pytest.mark.parametrize("field", ["format_version", "name", "layout", "payload", "series", "metrics",
                                   "created", "files", "versions", "extra"])
def test_from_json_rejects_missing_required_field(field):
    doc = valid_doc()
    del doc[field]
    with pytest.raises(CorruptCheckpointError, match=f"missing field '{field}'"):
        decode_doc(doc)


@pytest.mark.parametrize("field", ["step", "epoch", "batch", "monitor"])
def test_from_json_accepts_missing_optional_field(field):
    doc = valid_doc()
    del doc[field]
    assert getattr(decode_doc(doc), field) is None


@pytest.mark.parametrize("path", ["../x", "/abs", "a/../../b", "a/../b", "./a", "", "a\\b", "sub/../../../etc/passwd"])
def test_from_json_rejects_file_paths_escaping_the_checkpoint(path):
    doc = _set(valid_doc(), "files.0.path", path)
    with pytest.raises(CorruptCheckpointError, match="a file path escapes the checkpoint directory"):
        decode_doc(doc)


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "..", ".", ""])
def test_from_json_rejects_names_that_are_not_plain(name):
    doc = _set(valid_doc(), "name", name)
    with pytest.raises(CorruptCheckpointError, match="'name' must be a plain file or folder name"):
        decode_doc(doc)


def test_from_json_rejects_newer_format_version_asking_to_upgrade():
    doc = _set(valid_doc(), "format_version", FORMAT_VERSION + 1)
    with pytest.raises(CorruptCheckpointError, match=f"format_version {FORMAT_VERSION + 1} is newer .* Upgrade keepbest"):
        decode_doc(doc)


def test_from_json_error_names_the_manifest_source():
    doc = _set(valid_doc(), "step", "10")
    with pytest.raises(CorruptCheckpointError, match="Invalid manifest runs/b/manifest.json: field 'step'"):
        decode_doc(doc, source="runs/b/manifest.json")


@pytest.mark.parametrize("field", ["created", "metrics.val_loss"])
def test_from_json_rejects_integers_beyond_float_range(field):
    doc = _set(valid_doc(), field, 10**400)
    with pytest.raises(CorruptCheckpointError, match="Invalid manifest"):
        decode_doc(doc)


def test_from_json_rejects_deeply_nested_json():
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        Manifest.from_json(b"[" * 100_000 + b"]" * 100_000, source="m.json")


# --- is_safe_relative_path -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("state.safetensors", True),
        ("sub/dir/file.json", True),
        ("a.b", True),
        ("", False),
        (".", False),
        ("..", False),
        ("../x", False),
        ("a/../../b", False),
        ("a/../b", False),  # not normalised
        ("./a", False),
        ("a//b", False),
        ("a/", False),
        ("/abs", False),
        ("a\\b", False),
        ("a\x00b", False),
    ],
)
def test_is_safe_relative_path(path, expected):
    assert is_safe_relative_path(path) is expected


# --- fuzzing -------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _decodes_or_raises_corrupt(raw: bytes) -> None:
    """Any outcome but a Manifest or a CorruptCheckpointError naming the source fails the test."""
    result = error = None
    try:
        result = Manifest.from_json(raw, source="fuzz.json")
    except CorruptCheckpointError as e:
        error = e
    if error is not None:
        assert "fuzz.json" in str(error)
    else:
        assert isinstance(result, Manifest)


@FUZZ
@given(st.binary(max_size=200))
def test_from_json_of_arbitrary_bytes_decodes_or_raises_corrupt(raw):
    _decodes_or_raises_corrupt(raw)


@FUZZ
@given(json_values)
def test_from_json_of_arbitrary_json_decodes_or_raises_corrupt(doc):
    _decodes_or_raises_corrupt(json.dumps(doc).encode("utf-8"))


def _paths(doc, prefix=()):
    """Every (container, key) position in a decoded document."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc)
    for key, value in items:
        yield prefix + (key,)
        if isinstance(value, (dict, list)):
            yield from _paths(value, prefix + (key,))


VALID_PATHS = sorted(_paths(valid_doc()), key=repr)


@FUZZ
@given(st.sampled_from(VALID_PATHS), st.booleans(), json_values)
def test_from_json_of_mutated_manifest_decodes_or_raises_corrupt(path, delete, value):
    doc = copy.deepcopy(valid_doc())
    target = doc
    for key in path[:-1]:
        target = target[key]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    _decodes_or_raises_corrupt(json.dumps(doc).encode("utf-8"))


def test_from_json_reads_a_version_1_manifest_with_sha256_digests():
    doc = valid_doc()
    doc["format_version"] = 1
    for f in doc["files"]:
        f["sha256"] = f.pop("blake3")
    m = decode_doc(doc)
    assert [(f.algorithm, f.digest) for f in m.files] == [("sha256", f["sha256"]) for f in doc["files"]]


def test_from_json_rejects_a_file_without_a_digest():
    doc = valid_doc()
    del doc["files"][0]["blake3"]
    with pytest.raises(CorruptCheckpointError, match="needs exactly one digest"):
        decode_doc(doc)
