"""The background writer: one save in flight, in order, and no failure left unreported."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from keepbest.errors import AsyncSaveError
from keepbest.writer import WRITER_NICENESS, AsyncWriter, Staging, copy_all, host_buffer


@pytest.fixture
def writer():
    w = AsyncWriter()
    yield w
    try:
        w.close()
    except AsyncSaveError:
        pass  # a test that leaves a failure unreported checks that itself


def failing(message="No space left on device"):
    def job():
        raise OSError(28, message)
    return job


def test_result_returns_the_value_of_the_job(writer):
    assert writer.submit("a", lambda: 42).result() == 42


def test_job_runs_on_a_background_thread(writer):
    assert writer.submit("a", lambda: threading.current_thread().name).result().startswith("keepbest-writer")


def test_next_submit_waits_until_the_previous_save_finished(writer):
    gate, events = threading.Event(), []

    def slow():
        gate.wait(60)
        events.append("first done")

    def submit_second():
        events.append("second submitted")
        writer.submit("second", lambda: events.append("second ran"))
        events.append("second submit returned")

    writer.submit("first", slow)
    second = threading.Thread(target=submit_second)
    second.start()
    while "second submitted" not in events:
        time.sleep(0.001)
    time.sleep(0.2)  # time for a submit that did not wait to return (the order below holds either way)
    gate.set()
    second.join(60)
    writer.wait()
    # back-pressure: the second submit returned only once the first save had finished
    assert events.index("second submitted") < events.index("first done") < events.index("second submit returned")
    assert events.index("first done") < events.index("second ran")


def test_in_flight_is_the_unfinished_save(writer):
    gate = threading.Event()
    handle = writer.submit("slow", lambda: gate.wait(5))
    assert writer.in_flight is handle
    gate.set()
    writer.wait()
    assert writer.in_flight is None


def test_result_raises_the_original_error(writer):
    with pytest.raises(OSError, match="No space left on device"):
        writer.submit("ckpt-1", failing()).result()


def test_a_failure_collected_by_result_is_not_raised_again(writer):
    with pytest.raises(OSError):
        writer.submit("ckpt-1", failing()).result()
    writer.wait()
    writer.check()


def test_unreported_failure_is_raised_by_the_next_submit_naming_save_and_cause(writer):
    writer.submit("runs/a/ckpt-7", failing())
    ran = []
    with pytest.raises(AsyncSaveError, match=r"Background save of runs/a/ckpt-7 failed: OSError: .*No space left"):
        writer.submit("runs/a/ckpt-8", lambda: ran.append(1))
    writer.wait()
    assert ran == []  # the next save did not start


def test_async_save_error_chains_the_cause(writer):
    writer.submit("ckpt-1", failing())
    with pytest.raises(AsyncSaveError) as info:
        writer.wait()
    assert isinstance(info.value.__cause__, OSError) and isinstance(info.value, RuntimeError)


def test_unreported_failure_is_raised_by_wait_once(writer):
    writer.submit("ckpt-1", failing())
    with pytest.raises(AsyncSaveError, match="ckpt-1"):
        writer.wait()
    writer.wait()  # reported: not raised twice


def test_unreported_failure_is_raised_by_close(writer):
    writer.submit("ckpt-1", failing())
    with pytest.raises(AsyncSaveError, match="ckpt-1"):
        writer.close()


def test_check_raises_a_finished_failure(writer):
    handle = writer.submit("ckpt-1", failing())
    while not handle.done():
        time.sleep(0.01)
    with pytest.raises(AsyncSaveError, match="ckpt-1"):
        writer.check()


def test_check_never_blocks_on_a_save_in_flight(writer):
    gate, events = threading.Event(), []

    def slow():
        gate.wait(60)  # until check has returned (or, were check to wait for it, for 60 s)
        events.append("save finished")

    writer.submit("slow", slow)
    writer.check()
    events.append("check returned")
    gate.set()
    writer.wait()
    assert events == ["check returned", "save finished"]


def test_closed_writer_starts_again_on_submit(writer):
    writer.submit("a", lambda: 1).result()
    writer.close()
    assert writer.submit("b", lambda: 2).result() == 2


def test_close_frees_the_staging_buffers(writer):
    writer.staging.snapshot({"f": {"w": np.ones(1000)}})
    assert writer.staging.nbytes == 8000
    writer.close()
    assert writer.staging.nbytes == 0


def test_a_failure_nobody_collected_is_printed_at_exit(tmp_path):
    script = (
        "from keepbest.writer import AsyncWriter\n"
        "w = AsyncWriter()\n"
        "def job():\n"
        "    raise OSError(28, 'No space left on device')\n"
        "w.submit('runs/a/ckpt-3', job)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "keepbest: Background save of runs/a/ckpt-3 failed: OSError" in done.stderr


def test_a_pending_save_finishes_before_the_interpreter_exits(tmp_path):
    marker = tmp_path / "committed"
    script = (
        "import time\n"
        "from keepbest.writer import AsyncWriter\n"
        "w = AsyncWriter()\n"
        f"w.submit('slow', lambda: (time.sleep(0.5), open({str(marker)!r}, 'w').close()))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert marker.exists()


def test_snapshot_is_refused_while_a_save_is_in_flight(writer):
    gate = threading.Event()
    writer.submit("slow", lambda: gate.wait(5))
    with pytest.raises(RuntimeError, match="Cannot take a snapshot while a save is in flight"):
        writer.staging.snapshot({"f": {"w": np.ones(3)}})
    gate.set()
    writer.wait()
    writer.staging.snapshot({"f": {"w": np.ones(3)}})


# --- staging buffers --------------------------------------------------------------------------


def test_snapshot_is_a_copy_unaffected_by_later_changes():
    src = np.arange(6.0)
    snap = Staging().snapshot({"f": {"w": src}})
    src[:] = -1
    assert snap["f"]["w"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_snapshot_reuses_its_buffers_between_saves():
    staging = Staging()
    first = staging.snapshot({"f": {"w": np.zeros((2, 3), np.float32)}})["f"]["w"]
    second = staging.snapshot({"f": {"w": np.ones((2, 3), np.float32)}})["f"]["w"]
    assert second is first and second.tolist() == [[1.0] * 3] * 2


def test_snapshot_allocates_anew_when_shape_or_dtype_changes():
    staging = Staging()
    first = staging.snapshot({"f": {"w": np.zeros(3, np.float32)}})["f"]["w"]
    assert staging.snapshot({"f": {"w": np.zeros(4, np.float32)}})["f"]["w"] is not first
    assert staging.snapshot({"f": {"w": np.zeros(4, np.float64)}})["f"]["w"].dtype == np.float64


def test_snapshot_frees_buffers_of_tensors_it_no_longer_holds():
    staging = Staging()
    staging.snapshot({"f": {"a": np.zeros(100), "b": np.zeros(100)}})
    staging.snapshot({"f": {"a": np.zeros(100)}})
    assert staging.nbytes == 800


def test_snapshot_keeps_files_apart():
    snap = Staging().snapshot({"model": {"w": np.zeros(1)}, "optimizer": {"w": np.ones(1)}})
    assert (snap["model"]["w"].tolist(), snap["optimizer"]["w"].tolist()) == ([0.0], [1.0])


def test_snapshot_counts_the_buffers_it_allocates():
    staging = Staging()
    for _ in range(3):
        staging.snapshot({"f": {"a": np.zeros(10), "b": np.ones((2, 2), np.float32)}})
    assert staging.allocations == 2
    staging.snapshot({"f": {"a": np.zeros(11)}})
    assert staging.allocations == 3


def test_copy_all_copies_large_arrays_in_chunks_exactly():
    rng = np.random.default_rng(0)
    # 3 x 12 MB (chunked across threads, one of odd length), a strided view and a small one, as pairs
    sources = [rng.standard_normal(1_500_001).astype(np.float64), rng.integers(0, 255, 12_000_003, np.uint8),
               rng.standard_normal((3000, 1000)).astype(np.float32), rng.standard_normal((400, 300))[:, ::3],
               np.arange(5, dtype=np.int16)]
    targets = [np.full(s.shape, 7, s.dtype) for s in sources]
    copy_all(list(zip(targets, sources)))
    for t, s in zip(targets, sources):
        assert t.dtype == s.dtype and np.array_equal(t, s)


def test_large_host_buffers_are_writable_arrays_of_the_requested_shape():
    for shape, dtype in (((3, 1 << 20), np.float32), ((7,), np.int64), ((1024, 1024, 3), np.uint8)):
        buf = host_buffer(shape, np.dtype(dtype))
        buf[...] = 1
        assert buf.shape == shape and buf.dtype == dtype and buf.flags.writeable and int(buf.sum()) == buf.size


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread priorities are set on Linux only")
def test_the_writer_thread_runs_at_a_lower_priority_than_training(writer):
    import os

    def niceness():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    here = niceness()
    assert writer.submit("nice", niceness).result() == min(here + WRITER_NICENESS, 19) and WRITER_NICENESS > 0
    assert niceness() == here  # the caller's own priority is untouched


def test_the_writer_hashes_on_its_own_thread_while_the_caller_may_hash_on_every_core(writer):
    from keepbest import _digest

    assert _digest.parallel_allowed()
    assert writer.submit("hash", _digest.parallel_allowed).result() is False
    assert _digest.parallel_allowed()  # the caller's hashing is untouched
    data = np.random.default_rng(0).bytes(9 << 20)
    # the same digest either way
    assert writer.submit("digest", lambda: _digest.of_bytes(data)).result() == _digest.of_bytes(data)
    assert writer.submit("digest", lambda: (h := _digest.new(threads=True), h.update(data), h.hexdigest())[2]
                         ).result() == _digest.of_bytes(data)
