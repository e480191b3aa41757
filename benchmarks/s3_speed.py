"""Speed on S3: keepbest's save and restore on a local S3 server, next to a plain upload of the same bytes.

Run (from the repository root, after ``python3 scripts/dev.py setup``):

    .venv/bin/python benchmarks/s3_speed.py                                  # 10 MB and 1 GB of state
    .venv/bin/python benchmarks/s3_speed.py --sizes 10MB,100MB --rounds 2   # a quicker look
    .venv/bin/python benchmarks/s3_speed.py --orbax-python /tmp/orbax-venv/bin/python   # with Orbax

The server is moto's S3 (``tests/s3.py``: ThreadedMotoServer on 127.0.0.1), started in this
process. moto keeps the objects in this process too, so every measurement runs in a *child
process* of its own: the child's peak RSS is the method's, not the server's. The state is a
dict of float32 arrays totalling the size (8 large tensors and 8 small ones, as a model's
weights and biases). For each size, in interleaved rounds (medians reported):

- keepbest sync: ``CheckpointManager(s3://...).save(step, state)``. The first save of a
  process also creates the client and checks once that the server honours conditional
  writes; the figure is the second save (the steady state of a training run: same shapes,
  new values), whose requests are counted;
- keepbest async: ``save_async``: the stall (how long the call blocks: the snapshot into the
  staging buffers, reused from the first save) and the time until the checkpoint is durable;
- plain upload of the same bytes from a local file: ``s3fs.S3FileSystem.put`` and
  ``boto3`` ``upload_file`` (default TransferConfig: 8 MiB parts, 10 threads);
- restore, in a fresh process (cold verified cache): ``CheckpointManager.load()`` (download
  streamed and hashed, then memory-mapped) next to ``s3fs.S3FileSystem.get`` of the plain object
  into a local file;
- Keras's ``keras.callbacks.OrbaxCheckpoint`` writing to the same bucket, where orbax can
  (``--orbax-python``: a Python with ``orbax-checkpoint``; the error is printed otherwise);
- limit: a NumPy memcpy of the state into preallocated buffers.

Requests are counted in the child with a botocore ``before-send`` hook on the client (one per
HTTP request sent, retries included), by operation, and split into the checkpoint's data
objects, its manifest (the commit) and everything else (commit lock, records, listing).
Peak RSS: the child resets its high-water mark (``/proc/self/clear_refs``) once the state is
built, and reports ``VmHWM`` minus the RSS at that moment.

The tables are printed, and written to ``--out`` (markdown) when given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any, Callable
from _measure import parse_size, timed  # noqa: E402 - beside this script

ROOT = Path(__file__).resolve().parent.parent
MB, MiB = 1e6, 1 << 20
LARGE, SMALL = 8, 8  # tensors in the state: LARGE share the bytes, SMALL are 4 KiB each
OPS = ("PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload", "GetObject",
       "HeadObject", "ListObjectsV2", "DeleteObject")


# ================================================================================================
# The child: one method, one size, one round. Prints one line "RESULT {json}".
# ================================================================================================

def _per_tensor(nbytes: int) -> int:
    return max(1, (nbytes - SMALL * 4096) // (4 * LARGE))


def state_nbytes(nbytes: int) -> int:
    """The exact bytes of :func:`make_state`'s arrays."""
    return LARGE * 4 * _per_tensor(nbytes) + SMALL * 4096


def make_state(nbytes: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    each = _per_tensor(nbytes)
    state = {f"layer{i:02d}.kernel": rng.random(each, dtype=np.float32) for i in range(LARGE)}
    state.update({f"layer{i:02d}.bias": rng.random(1024, dtype=np.float32) for i in range(SMALL)})
    return state


def state_file(state: dict[str, Any], folder: Path) -> Path:
    """The state's bytes in one local file (what a plain upload sends)."""
    path = folder / "state.bin"
    with open(path, "wb") as f:
        for array in state.values():
            f.write(array.data)
    return path


def mutate(state: dict[str, Any]) -> None:
    """New values, same shapes: the next step of a training run."""
    for array in state.values():
        array[0] += 1.0


class Requests:
    """Counts the HTTP requests a botocore client sends, by operation and by kind of key."""

    def __init__(self, client: Any, checkpoint: str | None = None) -> None:
        self.checkpoint = checkpoint  # "<prefix>/<name>/": keys under it are the checkpoint's
        self.on = False
        self.ops: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()
        self.commit: list[str] = []  # the conditional header(s) of each manifest PUT
        self.log: list[str] = []  # "Operation key" of each request, in order
        client.meta.events.register("before-send.s3", self._seen)

    def _seen(self, request: Any, event_name: str = "", **_: Any) -> None:
        if not self.on:
            return None
        op = event_name.rsplit(".", 1)[-1]
        self.ops[op] += 1
        parsed = urllib.parse.urlparse(request.url)
        key = urllib.parse.unquote(parsed.path)
        self.log.append(f"{op} {key}" + (f"?{parsed.query}" if parsed.query and "Range" not in op else ""))
        manifest = bool(self.checkpoint) and key.endswith(f"{self.checkpoint}manifest.json")
        if manifest and op == "PutObject":
            self.kinds["commit"] += 1
            self.commit.append(", ".join(f"{h}: {_text(request.headers[h])}" for h in ("If-None-Match", "If-Match")
                                         if h in request.headers) or "unconditional")
        elif self.checkpoint and self.checkpoint in key and not manifest:
            self.kinds["data"] += 1
        else:
            self.kinds["other"] += 1
        return None  # anything else would be taken as the response

    def start(self) -> None:
        self.ops.clear()
        self.kinds.clear()
        self.commit.clear()
        self.log.clear()
        self.on = True

    def result(self) -> dict[str, Any]:
        self.on = False
        return {"ops": dict(self.ops), "kinds": dict(self.kinds), "commit": list(self.commit), "log": list(self.log)}


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def rss_reset() -> int:
    """Resets the peak-RSS mark to the current RSS (Linux); returns the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def rss_peak_since(base: int) -> int:
    return _status("VmHWM") - base


def s3_bucket(mgr: Any) -> Any:
    """The S3 requests of an s3:// manager's store go through this (``keepbest.store._object_io.Bucket``)."""
    return mgr.store.bucket


def child_keepbest_sync(nbytes: int, url: str, work: Path) -> dict[str, Any]:
    import keepbest

    state = make_state(nbytes)
    mgr = keepbest.CheckpointManager(url)
    base = rss_reset()
    first = timed(lambda: mgr.save(1, state))
    mutate(state)
    bucket = s3_bucket(mgr)
    requests = Requests(bucket.fs.s3, f"{bucket.prefix}/ckpt-000000002/")
    requests.start()
    seconds = timed(lambda: mgr.save(2, state))
    out = {"seconds": seconds, "first": first, "rss": rss_peak_since(base), "requests": requests.result()}
    mgr.close()
    return out


def child_keepbest_async(nbytes: int, url: str, work: Path) -> dict[str, Any]:
    import keepbest

    state = make_state(nbytes)
    mgr = keepbest.CheckpointManager(url)
    base = rss_reset()
    start = time.perf_counter()
    handle = mgr.save_async(1, state)  # allocates the staging buffers
    first_stall = time.perf_counter() - start
    handle.result()
    mutate(state)
    bucket = s3_bucket(mgr)
    requests = Requests(bucket.fs.s3, f"{bucket.prefix}/ckpt-000000002/")
    requests.start()
    start = time.perf_counter()
    handle = mgr.save_async(2, state)
    stall = time.perf_counter() - start
    handle.result()
    durable = time.perf_counter() - start
    out = {"seconds": durable, "stall": stall, "first_stall": first_stall, "rss": rss_peak_since(base),
           "requests": requests.result()}
    mgr.close()
    return out


def child_keepbest_restore(nbytes: int, url: str, work: Path) -> dict[str, Any]:
    import keepbest

    mgr = keepbest.CheckpointManager(url)  # lists the prefix and settles leftovers: not timed
    requests = Requests(s3_bucket(mgr).fs.s3)
    base = rss_reset()
    requests.start()
    tensors: dict[str, Any] = {}
    seconds = timed(lambda: tensors.update(mgr.load()))
    got = sum(a.nbytes for a in tensors.values())
    if got < nbytes * 0.99:
        raise AssertionError(f"restored {got} bytes, expected about {nbytes}")
    return {"seconds": seconds, "rss": rss_peak_since(base), "requests": requests.result()}


def _s3fs(url: str) -> Any:
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.pipe(f"{url}/warm", b"x")  # the client and its connection exist before the clock starts
    return fs


def child_s3fs_put(nbytes: int, url: str, work: Path) -> dict[str, Any]:
    path = state_file(make_state(nbytes), work)
    fs = _s3fs(url)
    requests = Requests(fs.s3)
    base = rss_reset()
    requests.start()
    seconds = timed(lambda: fs.put(str(path), f"{url}/plain.bin"))
    return {"seconds": seconds, "rss": rss_peak_since(base), "requests": requests.result()}


def child_boto3_upload(nbytes: int, url: str, work: Path) -> dict[str, Any]:
    import boto3

    path = state_file(make_state(nbytes), work)
    parsed = urllib.parse.urlparse(url)
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    client = boto3.client("s3")
    client.put_object(Bucket=bucket, Key=f"{prefix}/warm", Body=b"x")
    requests = Requests(client)
    base = rss_reset()
    requests.start()
    seconds = timed(lambda: client.upload_file(str(path), bucket, f"{prefix}/boto3.bin"))
    return {"seconds": seconds, "rss": rss_peak_since(base), "requests": requests.result()}


def child_s3fs_get(nbytes: int, url: str, work: Path) -> dict[str, Any]:
    fs = _s3fs(url)
    requests = Requests(fs.s3)
    base = rss_reset()
    requests.start()
    seconds = timed(lambda: fs.get(f"{url}/plain.bin", str(work / "got.bin")))
    if (work / "got.bin").stat().st_size != state_nbytes(nbytes):
        raise AssertionError("s3fs get returned a different size")
    return {"seconds": seconds, "rss": rss_peak_since(base), "requests": requests.result()}


def child_memcpy(nbytes: int, url: str, work: Path) -> dict[str, Any]:
    import numpy as np

    state = make_state(nbytes)
    targets = {k: np.empty_like(a) for k, a in state.items()}
    for k, a in state.items():  # touch the targets: a training loop's buffers exist already
        np.copyto(targets[k], a)
    mutate(state)
    start = time.perf_counter()
    for k, a in state.items():
        np.copyto(targets[k], a)
    return {"seconds": time.perf_counter() - start}


def child_orbax(nbytes: int, url: str, work: Path) -> dict[str, Any]:
    """Keras's OrbaxCheckpoint callback on a model holding about ``nbytes`` of state (weights + Adam)."""
    import logging

    try:
        import orbax.checkpoint  # noqa: F401
    except ImportError as e:
        return {"error": f"orbax-checkpoint is not installed in {sys.executable} ({e}); pass --orbax-python"}
    import keras
    import numpy as np

    width = 2048 if nbytes >= 100e6 else 512
    layers = max(1, round(nbytes / 3 / (width * width * 4)))
    model = keras.Sequential([keras.Input((width,))] + [keras.layers.Dense(width) for _ in range(layers)])
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    state_bytes = sum(int(np.prod(v.shape)) * 4 for v in model.weights + model.optimizer.variables)
    os.chdir(work)  # where a path orbax mangles into a local one ("s3:/bucket/...") lands
    logged: list[str] = []  # orbax logs the first failure (in a worker thread) and raises a later one
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda record: logged.append(record.getMessage())  # type: ignore[method-assign]
    absl = logging.getLogger("absl")
    absl.addHandler(handler)
    absl.propagate = False
    base = rss_reset()
    try:
        cb = keras.callbacks.OrbaxCheckpoint(url, save_on_background=True)
        cb.set_model(model)
        cb.on_train_begin()
        start = time.perf_counter()
        cb.on_epoch_end(0, {"loss": 1.0})
        stall = time.perf_counter() - start
        cb.wait_until_finished()
        durable = time.perf_counter() - start
        cb.on_train_end()
    except Exception as e:  # report why, as the table's row
        raised = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        cause = next((m.split("raised an exception: ", 1)[1].splitlines()[0] for m in logged
                      if "raised an exception: " in m), None)
        error = f"{cause} (first error logged by orbax; raised: {raised})" if cause else raised
        stray = [p for p in Path("s3:").rglob("*") if p.is_file()] if Path("s3:").exists() else []
        if stray:  # orbax wrote these to a local folder named after the mangled URL
            error += f"; it also wrote {len(stray)} local file(s) under ./s3:/ (e.g. {stray[0]})"
        return {"error": error}
    return {"seconds": durable, "stall": stall, "rss": rss_peak_since(base), "state_bytes": state_bytes}


CHILDREN: dict[str, Callable[[int, str, Path], dict[str, Any]]] = {
    "memcpy": child_memcpy,
    "kb_sync": child_keepbest_sync,
    "kb_async": child_keepbest_async,
    "kb_restore": child_keepbest_restore,
    "s3fs_put": child_s3fs_put,
    "boto3_upload": child_boto3_upload,
    "s3fs_get": child_s3fs_get,
    "orbax": child_orbax,
}


def child_main(method: str, nbytes: int, url: str, work: str) -> int:
    folder = Path(tempfile.mkdtemp(prefix="s3-speed-", dir=work))
    try:
        out = CHILDREN[method](nbytes, url, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print("RESULT " + json.dumps(out), flush=True)
    return 0


# ================================================================================================
# The parent: the server, the rounds, the tables.
# ================================================================================================

class Run:
    def __init__(self, server: Any, work: Path, orbax_python: str) -> None:
        self.server = server
        self.work = work
        self.orbax_python = orbax_python
        self.failed: dict[tuple[str, int], str] = {}  # a method that cannot run at a size is not retried

    def child(self, method: str, nbytes: int, url: str) -> dict[str, Any]:
        if (method, nbytes) in self.failed:
            return {"error": self.failed[(method, nbytes)]}
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
        python = sys.executable
        if method == "orbax":
            python = self.orbax_python
            env.update(KERAS_BACKEND="jax", KERAS_HOME=str(ROOT / ".keras_home"))
        done = subprocess.run([python, __file__, "--child", method, "--bytes", str(nbytes), "--url", url,
                               "--dir", str(self.work)], env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            out = {"error": f"the child exited with {done.returncode}: {tail}"}
            print(done.stderr[-3000:], file=sys.stderr)
        else:
            out = json.loads(lines[-1][len("RESULT "):])
        if "error" in out:
            self.failed[(method, nbytes)] = out["error"]
        return out

    def remove(self, url: str) -> None:
        """Deletes every object under ``url`` (moto holds them in this process's memory)."""
        client = self.server.client()
        prefix = urllib.parse.urlparse(url).path.strip("/") + "/"
        bucket = urllib.parse.urlparse(url).netloc
        while True:
            page = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if not keys:
                break
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
        for upload in client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])

    def size(self, nbytes: int, rounds: int) -> dict[str, list[dict[str, Any]]]:
        results: dict[str, list[dict[str, Any]]] = {}
        for r in range(rounds):  # interleaved, so a slow moment of the machine hits every method alike
            base = f"{self.server.url(f'bench-{nbytes}-r{r}')}"
            plan = [("memcpy", base), ("kb_sync", f"{base}/kb-sync"), ("kb_restore", f"{base}/kb-sync"),
                    ("kb_async", f"{base}/kb-async"), ("s3fs_put", f"{base}/plain"),
                    ("boto3_upload", f"{base}/plain"), ("s3fs_get", f"{base}/plain"),
                    ("orbax", f"{base}/orbax")]
            for method, url in plan:
                print(f"  round {r + 1}/{rounds}: {method} ...", flush=True)
                results.setdefault(method, []).append(self.child(method, nbytes, url))
                if method in ("kb_restore", "kb_async", "s3fs_get", "orbax"):
                    self.remove(url)
            self.remove(base)
        return results


def median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else None


def speed_table(nbytes: int, runs: dict[str, list[dict[str, Any]]]) -> str:
    notes: list[str] = []

    def row(label: str, method: str, key: str = "seconds", rss: bool = True, size: int = nbytes) -> str:
        got = runs.get(method, [])
        errors = [r["error"] for r in got if "error" in r]
        if errors:
            notes.append(f"- {label} fails: {errors[0]}")
            return f"| {label} | fails (below) | | |"
        seconds = median(got, key)
        if seconds is None:
            return f"| {label} | not run | | |"
        sized = median(got, "state_bytes") or size
        peak = median(got, "rss") if rss else None
        return (f"| {label} | {seconds:.3f} | {sized / seconds / MB:,.0f} | "
                f"{'' if peak is None else f'{peak / MiB:,.0f}'} |")

    lines = [f"\n### {nbytes / MB:,.0f} MB of state ({LARGE} float32 tensors of "
             f"{(nbytes - SMALL * 4096) / LARGE / MB:,.2f} MB and {SMALL} of 4 KiB)\n",
             "| method | time (s) | MB/s | peak RSS increase (MiB) |", "|---|---:|---:|---:|",
             row("keepbest sync `save` (2nd save of the process)", "kb_sync"),
             row("keepbest sync `save`, 1st of the process (client, probe)", "kb_sync", "first", rss=False),
             row("keepbest `save_async`: stall (call returns)", "kb_async", "stall", rss=False),
             row("keepbest `save_async`: until durable (peak RSS: both saves)", "kb_async"),
             row("keepbest `save_async`: stall of the 1st save (allocates staging)", "kb_async", "first_stall",
                 rss=False),
             row("plain: s3fs `put` of a local file", "s3fs_put"),
             row("plain: boto3 `upload_file` of a local file", "boto3_upload"),
             row("Keras `OrbaxCheckpoint` (background save): until durable", "orbax"),
             row("keepbest restore: `CheckpointManager.load()`, fresh process", "kb_restore"),
             row("plain: s3fs `get` into a local file", "s3fs_get"),
             row("limit: memcpy of the state", "memcpy", rss=False)]
    return "\n".join(lines + ([""] + notes if notes else []))


def requests_table(results: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """Requests of one save / restore (the last round's), by operation; one column per size."""
    sizes = list(results)
    columns = [(label, method) for label in sizes for method in ("kb_sync", "kb_restore", "s3fs_put",
                                                                  "boto3_upload")]

    def counted(label: str, method: str) -> dict[str, Any]:
        runs = [r for r in results[label].get(method, []) if "requests" in r]
        return runs[-1]["requests"] if runs else {"ops": {}, "kinds": {}, "commit": []}

    names = {"kb_sync": "keepbest save", "kb_restore": "keepbest load", "s3fs_put": "s3fs put",
             "boto3_upload": "boto3 upload_file"}
    head = "| request | " + " | ".join(f"{names[m]} {label}" for label, m in columns) + " |"
    lines = [head, "|---|" + "---:|" * len(columns)]
    seen = {op for label, m in columns for op in counted(label, m)["ops"]}
    for op in [*OPS, *sorted(seen - set(OPS))]:
        lines.append(f"| {op} | " + " | ".join(str(counted(label, m)["ops"].get(op, 0)) for label, m in columns)
                     + " |")
    lines.append("| **total** | " + " | ".join(f"**{sum(counted(label, m)['ops'].values())}**"
                                                for label, m in columns) + " |")
    lines.append("| all but UploadPart | " + " | ".join(
        str(sum(n for op, n in counted(label, m)["ops"].items() if op != "UploadPart")) for label, m in columns)
        + " |")
    for kind, text in (("data", "on the checkpoint's data objects"), ("commit", "the commit: PUT of the manifest"),
                       ("other", "lock, records, listing")):
        lines.append(f"| keepbest save: {text} | " + " | ".join(
            str(counted(label, m)["kinds"].get(kind, 0)) if m == "kb_sync" else "" for label, m in columns) + " |")
    commits = {label: counted(label, "kb_sync")["commit"] for label in sizes}
    notes = "; ".join(f"{label}: {', '.join(c) or 'none seen'}" for label, c in commits.items())
    sequence: list[list[Any]] = []  # the smallest size's save, request by request (runs of one request folded)
    for line in counted(sizes[0], "kb_sync").get("log", []):
        op, key = line.split(" ", 1)
        key = "(the prefix)" if op == "ListObjectsV2" else key.split("?")[0].split("/", 3)[-1]  # relative
        if sequence and sequence[-1][:2] == [op, key]:
            sequence[-1][2] += 1
        else:
            sequence.append([op, key, 1])
    steps = "\n".join(f"{i}. {op} `{key}`" + (f" x{n}" if n > 1 else "") for i, (op, key, n) in
                      enumerate(sequence, 1))
    return "\n".join(lines) + (f"\n\nThe commit PUT's condition header: {notes}.\n\nThe {sizes[0]} save, "
                               f"request by request (keys relative to the run's prefix):\n\n{steps}")


def memory_lines(results: dict[str, dict[str, list[dict[str, Any]]]], sizes: dict[str, int]) -> str:
    """Peak RSS of each save beside what it holds by design (the staging copy when async, the part buffers),
    and how much it grows from the smallest state to the largest."""
    from keepbest.store import _object_io

    part, parallel = _object_io.PART, _object_io.PARALLEL_PARTS
    parts = part * (parallel + 1)  # the part buffers: the parts in flight and the one being filled
    lines = [f"Part buffers: {part >> 20} MiB x ({parallel}+1) = {parts / MiB:,.0f} MiB; the rest is the S3 "
             "client's own memory (connections, botocore, aiohttp) and the interpreter's."]
    syncs = {}
    for label, runs in results.items():
        nbytes = sizes[label]
        sync, both = median(runs.get("kb_sync", []), "rss"), median(runs.get("kb_async", []), "rss")
        if sync is not None:
            syncs[label] = sync
            lines.append(f"- {label}: keepbest sync save raised peak RSS by {sync / MiB:,.0f} MiB "
                         f"({sync / nbytes:.1%} of the state).")
        if both is not None:
            lines.append(f"- {label}: keepbest save_async (first save allocates the staging copy, then a second "
                         f"save) raised peak RSS by {both / MiB:,.0f} MiB: the staging copy ({nbytes / MiB:,.0f} "
                         f"MiB) + {(both - nbytes) / MiB:,.0f} MiB.")
    if len(syncs) > 1:
        small, large = min(syncs, key=lambda k: sizes[k]), max(syncs, key=lambda k: sizes[k])
        lines.append(f"- From {small} to {large} ({sizes[large] / sizes[small]:,.0f}x the bytes) the sync save's "
                     f"peak grows by {(syncs[large] - syncs[small]) / MiB:,.0f} MiB.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10MB,1GB", help="state sizes, comma separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="local scratch folder (default: the system temp folder)")
    parser.add_argument("--out", default=None, help="also write the report here (markdown)")
    parser.add_argument("--orbax-python", default=sys.executable,
                        help="the Python that runs Keras's OrbaxCheckpoint (needs orbax-checkpoint and jax)")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = Path(args.dir or tempfile.gettempdir())
    if args.child:
        return child_main(args.child, args.bytes, args.url, str(work))

    sys.path.insert(0, str(ROOT))
    from tests.s3 import S3Server

    import keepbest

    server = S3Server()
    try:
        run = Run(server, work, args.orbax_python)
        sizes = {text: parse_size(text) for text in args.sizes.split(",")}
        results = {}
        for label, nbytes in sizes.items():
            print(f"measuring {label} ...", flush=True)
            results[label] = run.size(nbytes, args.rounds)
    finally:
        server.stop()
    import boto3
    import moto
    import s3fs

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    report = "\n".join([
        "# Speed on S3: keepbest vs a plain upload of the same bytes",
        "",
        f"Generated by `benchmarks/s3_speed.py --sizes {args.sizes} --rounds {args.rounds}`: keepbest "
        f"{keepbest.__version__}, moto {moto.__version__} (ThreadedMotoServer on 127.0.0.1), s3fs "
        f"{s3fs.__version__}, boto3 {boto3.__version__}, Python {platform.python_version()}, {os.cpu_count()} "
        f"cores ({cpu}). Medians of {args.rounds} interleaved rounds; each figure from a child process.",
        "",
        "moto is an in-memory Python server sharing these cores with the client, so absolute throughput is "
        "moto's limit, not S3's: what the figures are for is the comparison with a plain upload and download of "
        "the same bytes in the same rounds, and the request counts and peak memory, which do not depend on the "
        "server.",
        "",
        "\n".join(speed_table(sizes[label], runs) for label, runs in results.items()),
        "",
        "### Requests of one save (steady state) and one restore",
        "",
        requests_table(results),
        "",
        "### Peak RSS while saving",
        "",
        memory_lines(results, sizes),
        "",
    ])
    print(report)
    if args.out:
        Path(args.out).write_text(report)
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
