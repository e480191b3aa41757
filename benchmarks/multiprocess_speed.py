"""Saving from 2 processes against 1: training stall per save and bytes written per process.

Run (from the repository root, after ``python3 scripts/dev.py setup``):

    .venv/bin/python benchmarks/multiprocess_speed.py                 # 10 MB and 100 MB of weights
    .venv/bin/python benchmarks/multiprocess_speed.py --sizes 300MB

Keras 3 on JAX (CPU, gloo collectives), an MLP with that many bytes of
float32 weights trained with Adam (state = 3x the weights), ``DataParallel``
over 1 process or 2 local processes (``keras.distribution.initialize``, each
process feeding its own half of the batch), and keepbest's ``ModelCheckpoint``
saving to one folder at every epoch end, sync and ``async_save=True``. Per
configuration, in one run:

- stall: the median time ``on_epoch_end`` blocks the training thread (the
  first save, which allocates the staging buffers, is left out). Between
  saves the training thread sleeps ``--gap`` seconds (simulated accelerator
  compute), so a background save can finish before the next one;
- bytes per process: what each process wrote per save, read from the
  committed manifests (each process's shard files; process 0 also writes
  the index files and the manifest);
- memcpy: a NumPy copy of this process's share of the state, the floor of
  an async stall.

On this machine both processes share 2 cores and one disk, so a second
process halves the bytes each one writes but does not double the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from _measure import parse_size  # noqa: E402 - beside this script

ROOT = Path(__file__).resolve().parent.parent


def worker(args: argparse.Namespace) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import keras
    import numpy as np

    if args.world > 1:
        keras.distribution.initialize(job_addresses=f"127.0.0.1:{args.port}", num_processes=args.world,
                                      process_id=args.rank)
    devices = jax.devices()
    keras.distribution.set_distribution(keras.distribution.DataParallel(
        device_mesh=keras.distribution.DeviceMesh((len(devices),), ["batch"], devices), auto_shard_dataset=False))
    from keepbest.keras import ModelCheckpoint

    width = 1024
    depth = max(1, round(args.bytes / 4 / (width * width)))
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((width,))] + [keras.layers.Dense(width) for _ in range(depth)])
    model.compile(optimizer="adam", loss="mse")
    stalls: list[float] = []

    class Timed(ModelCheckpoint):
        def on_epoch_end(self, epoch, logs=None):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            super().on_epoch_end(epoch, logs)
            stalls.append(time.perf_counter() - t)

    gap = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: time.sleep(args.gap))
    x = np.random.default_rng(args.rank).normal(size=(64 // args.world, width)).astype("float32")
    checkpoint = Timed(os.path.join(args.dir, "ckpt-{epoch:02d}"), async_save=args.async_save, keep_last=2)
    model.fit(x, x, batch_size=32 // args.world, epochs=args.epochs, verbose=0, callbacks=[gap, checkpoint])
    state = [np.asarray(v.value.addressable_shards[0].data) for v in
             list(model.weights) + list(model.optimizer.variables)]
    share = [a for i, a in enumerate(state) if i % args.world == args.rank]  # about this process's share
    buffers = [np.empty_like(a) for a in share]
    copies = []
    for _ in range(3):
        t = time.perf_counter()
        for dst, src in zip(buffers, share):
            np.copyto(dst, src)
        copies.append(time.perf_counter() - t)
    with open(f"{args.dir}/report-{args.rank}.json", "w") as f:
        json.dump({"stalls": stalls[1:], "memcpy": min(copies)}, f)


def run(world: int, weight_bytes: int, async_save: bool, epochs: int, gap: float, root: Path) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(dir=root))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
           "KERAS_HOME": os.environ.get("KERAS_HOME", str(ROOT / ".keras_home")), "PYTHONWARNINGS": "ignore"}
    children = [subprocess.Popen([sys.executable, __file__, "--worker", "--rank", str(r), "--world", str(world),
                                  "--port", str(port), "--dir", str(folder), "--bytes", str(weight_bytes),
                                  "--epochs", str(epochs), "--gap", str(gap)] + (["--async-save"] if async_save else []),
                                 env=env, cwd=ROOT) for r in range(world)]
    if any(c.wait() for c in children):
        raise SystemExit(f"a worker failed ({world} process(es), {weight_bytes} bytes)")
    reports = [json.loads((folder / f"report-{r}.json").read_text()) for r in range(world)]
    manifests = [json.loads(p.read_text()) for p in folder.glob("ckpt-*/manifest.json")]
    written = []
    for r in range(world):
        per_save = [sum(f["size"] for f in m["files"] if world == 1 or f"-p{r:05d}-" in f["path"]) for m in manifests]
        written.append(statistics.mean(per_save))
    import shutil

    shutil.rmtree(folder)
    return {"stall": statistics.median(s for rep in reports for s in rep["stalls"]),
            "memcpy": max(rep["memcpy"] for rep in reports), "written": written}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10MB,100MB")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--gap", type=float, default=2.0, help="seconds of simulated compute between saves")
    p.add_argument("--dir", default=None, help="where to write (default: the system temp folder)")
    p.add_argument("--out", default=str(Path(__file__).with_name("MULTIPROCESS_RESULTS.md")))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--bytes", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--async-save", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    root = Path(args.dir or tempfile.gettempdir())
    lines = ["| weights | processes | save | stall per save | memcpy of a process's share | bytes written per "
             "process per save |", "|---|---|---|---|---|---|"]
    for size in args.sizes.split(","):
        weight_bytes = parse_size(size)
        for async_save in (False, True):
            for world in (1, 2):
                r = run(world, weight_bytes, async_save, args.epochs, args.gap, root)
                row = (f"| {size} | {world} | {'async' if async_save else 'sync'} | {r['stall'] * 1e3:.0f} ms | "
                       f"{r['memcpy'] * 1e3:.0f} ms | {' / '.join(f'{w / 1e6:.1f} MB' for w in r['written'])} |")
                print(row, flush=True)
                lines.append(row)
    header = (f"# Saving from 2 processes against 1\n\n`benchmarks/multiprocess_speed.py --sizes {args.sizes}`, "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
              f"{platform.python_version()}, Keras on JAX (CPU), DataParallel; {args.epochs} epochs, a save at each "
              f"epoch end into one local folder, {args.gap:g} s of simulated compute between saves, keep_last=2. State = weights + Adam's 2 slots.\n\n")
    Path(args.out).write_text(header + "\n".join(lines) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
