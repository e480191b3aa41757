"""The snapshot of an async save: after the first save it allocates nothing, and it is the state exactly."""

from __future__ import annotations

import tracemalloc

import keras
import numpy as np

import keepbest.keras

from keepbest.keras import ModelCheckpoint, _host
from keepbest.keras._state import model_tensors, saved_variables
from keepbest.writer import Staging


def _model() -> keras.Model:
    """36 MB of state with Adam, in tensors of 4 MB: large enough for huge pages and copies on every core."""
    model = keras.Sequential([keras.Input((1024,))] + [keras.layers.Dense(1024) for _ in range(3)])
    model.compile(optimizer="adam", loss="mse")
    return model


def _step(model: keras.Model, seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal((8, 1024)).astype("float32")
    model.train_on_batch(x, x)


def test_a_snapshot_after_the_first_allocates_no_buffer_and_copies_the_state_exactly():
    model = _model()
    _step(model, 0)
    staging = Staging()
    first = model_tensors(model, staging).tensors
    count = sum(len(ts) for ts in first.values())
    state_bytes = sum(a.nbytes for ts in first.values() for a in ts.values())
    assert staging.allocations == count and state_bytes > 30e6
    for seed in (1, 2, 3):
        _step(model, seed)
        tracemalloc.start()
        try:
            snap = model_tensors(model, staging).tensors
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert staging.allocations == count, "a later snapshot allocated staging buffers"
        # NumPy reports its allocations to tracemalloc: no hidden per-variable copy either.
        assert peak < 1e6, f"a later snapshot allocated {peak} bytes (state: {state_bytes})"
        for fname, variables in saved_variables(model).items():
            for path, v in variables.items():
                assert snap[fname][path] is first[fname][path]  # the same buffer, refilled
                assert np.array_equal(snap[fname][path], _host.view(v)), path


def test_async_saves_during_fit_allocate_staging_once(tmp_path):
    model = _model()
    cb = ModelCheckpoint(str(tmp_path / "ckpt"), monitor="loss", async_save=True)
    x = np.random.default_rng(0).standard_normal((32, 1024)).astype("float32")
    model.fit(x, x, epochs=4, batch_size=8, verbose=0, callbacks=[cb])
    count = sum(len(vs) for vs in saved_variables(model).values())
    assert cb._writer.staging.allocations == count


def test_the_snapshot_buffers_are_prepared_at_train_begin_so_the_first_save_allocates_none(tmp_path):
    model = _model()
    _step(model, 0)
    cb = ModelCheckpoint(str(tmp_path / "ckpt"), monitor="loss", async_save=True)
    cb.set_model(model)
    cb.on_train_begin()
    cb.wait()  # the buffers are prepared on the writer thread
    count = sum(len(vs) for vs in saved_variables(model).values())
    assert cb._writer.staging.allocations == count
    cb.on_epoch_end(0, {"loss": 1.0})
    cb.on_epoch_end(1, {"loss": 0.5})
    cb.on_train_end()
    assert cb._writer.staging.allocations == count
    restored = _model()
    _step(restored, 9)
    keepbest.keras.load_weights(restored, str(tmp_path / "ckpt"))
    for a, b in zip(restored.weights + restored.optimizer.variables, model.weights + model.optimizer.variables):
        assert np.array_equal(_host.view(a), _host.view(b))


def test_reserve_allocates_what_a_snapshot_needs_and_faults_it_in():
    staging = Staging()
    staging.reserve({"f": {"w": ((1 << 20,), np.dtype(np.float32)), "b": ((3,), np.dtype(np.int8))}})
    assert staging.allocations == 2 and staging.nbytes == (4 << 20) + 3
    snap = staging.snapshot({"f": {"w": np.ones(1 << 20, np.float32), "b": np.arange(3, dtype=np.int8)}})
    assert staging.allocations == 2 and snap["f"]["w"].sum() == 1 << 20 and snap["f"]["b"].tolist() == [0, 1, 2]
