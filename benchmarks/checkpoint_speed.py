"""Training stall, persist throughput and restore time: Keras vs keepbest, next to the machine's limits.

Run (from the repository root, after ``python3 scripts/dev.py setup``):

    .venv/bin/python benchmarks/checkpoint_speed.py                  # 10 MB, 100 MB, 1 GB of weights
    .venv/bin/python benchmarks/checkpoint_speed.py --sizes 10MB     # a quick look

For each size an MLP with that many bytes of float32 weights is trained one
step with Adam (so the state is weights + 2 slots = 3x the weights), then each
way of checkpointing it is timed in interleaved rounds (medians reported):

- stall: how long the training thread is blocked by one checkpoint. For Keras
  and keepbest sync that is the whole save; for keepbest async it is the
  ``on_epoch_end`` call that snapshots the state into host buffers (steady
  state: the buffers are reused from the previous save);
- persist: state bytes / time until the checkpoint is durable (keepbest
  fsyncs; Keras's own writers do not, so their figure flatters them);
- restore: into an already built model (weights and optimizer state), or
  ``keras.models.load_model`` for ``.keras``.

Limits, measured in the same rounds on the same bytes: a NumPy memcpy of the
state into a preallocated buffer, ``dd bs=64M conv=fsync`` of the same size
into the same folder, and reading our safetensors files with the
``safetensors`` package (mmap) and assigning every variable.

The table is printed and written to ``--out`` (markdown).
"""

from __future__ import annotations

import argparse
import json
import gc
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("KERAS_HOME", str(Path(__file__).resolve().parent.parent / ".keras_home"))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keepbest.keras  # noqa: E402
from keepbest.keras import _host  # noqa: E402
from keepbest.keras import ModelCheckpoint  # noqa: E402
from _measure import dd_seconds, drop, parse_size, timed  # noqa: E402 - beside this script

GB = 1e9


def build_model(weight_bytes: int) -> keras.Model:
    """An MLP of square Dense layers holding about ``weight_bytes`` of float32 weights, Adam built."""
    width = 4096 if weight_bytes >= 512e6 else (2048 if weight_bytes >= 64e6 else 1024)
    layers = max(1, round(weight_bytes / (width * width * 4)))
    model = keras.Sequential([keras.Input((width,))] + [keras.layers.Dense(width) for _ in range(layers)])
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).standard_normal((8, width)).astype("float32")
    model.train_on_batch(x, x)
    return model


def state_bytes(model: keras.Model) -> int:
    return sum(int(np.prod(v.shape)) * 4 for v in model.weights + model.optimizer.variables)


class Bench:
    def __init__(self, model: keras.Model, work: Path) -> None:
        self.model = model
        self.work = work
        self.nbytes = state_bytes(model)
        self.host = [np.ones(v.shape, "float32") for v in model.weights + model.optimizer.variables]  # touched
        self.times: dict[str, list[float]] = {}
        self.epoch = 0
        self.sync_cb = self._callback("kb-sync", async_save=False)
        self.async_cb = self._callback("kb-async", async_save=True)
        self.async_cb.on_epoch_end(0, {"loss": 1.0})  # the first save allocates the staging buffers
        self.async_cb.wait()

    def _callback(self, name: str, async_save: bool) -> ModelCheckpoint:
        cb = ModelCheckpoint(str(self.work / name), monitor="loss", async_save=async_save)
        cb.set_model(self.model)
        cb.on_train_begin()
        return cb

    def record(self, key: str, seconds: float) -> None:
        self.times.setdefault(key, []).append(seconds)

    def median(self, key: str) -> float:
        return statistics.median(self.times[key])

    # -- limits ------------------------------------------------------------------------------
    def memcpy(self) -> None:
        sources = [_host.view(v) for v in self.model.weights + self.model.optimizer.variables]
        self.record("memcpy", timed(lambda: [np.copyto(d, s) for d, s in zip(self.host, sources)]))

    def dd(self) -> None:
        self.record("dd", dd_seconds(self.work / "dd.bin", self.nbytes))

    # -- Keras -------------------------------------------------------------------------------
    def keras_file(self) -> None:
        target = self.work / "m.keras"
        self.record("keras.keras save", timed(lambda: self.model.save(target)))
        self.record("keras.keras restore", timed(lambda: keras.models.load_model(target)))
        drop(target)

    def keras_weights(self) -> None:
        target = self.work / "m.weights.h5"
        self.record("keras.weights.h5 save", timed(lambda: self.model.save_weights(target)))
        self.record("keras.weights.h5 restore", timed(lambda: self.model.load_weights(target)))
        drop(target)

    # -- keepbest ----------------------------------------------------------------------------
    def keepbest_sync(self) -> None:
        self.epoch += 1
        self.record("keepbest sync save", timed(lambda: self.sync_cb.on_epoch_end(self.epoch, {"loss": 1.0})))
        self.record("keepbest restore", timed(lambda: keepbest.keras.load_weights(self.model, self.work / "kb-sync")))
        self.record("safetensors mmap restore", timed(lambda: self._safetensors_restore(self.work / "kb-sync")))

    def keepbest_async(self) -> None:
        self.epoch += 1
        start = time.perf_counter()
        self.async_cb.on_epoch_end(self.epoch, {"loss": 1.0})
        returned = time.perf_counter()
        self.async_cb.wait()
        self.record("keepbest async stall", returned - start)
        self.record("keepbest async persist", time.perf_counter() - returned)

    def _safetensors_restore(self, folder: Path) -> None:
        from safetensors import safe_open

        from keepbest.keras._state import OPTIMIZER_FILE, WEIGHTS_FILE, unique_paths

        for fname, variables in ((WEIGHTS_FILE, self.model.weights), (OPTIMIZER_FILE, self.model.optimizer.variables)):
            wanted = dict(zip(unique_paths(variables), variables))
            with safe_open(str(folder / fname), framework="numpy") as f:
                shards = json.loads((f.metadata() or {}).get("keepbest.shards", "[]"))  # large tensors live there
            for name in [fname, *shards]:
                with safe_open(str(folder / name), framework="numpy") as f:
                    for path in f.keys():
                        wanted.pop(path).assign(f.get_tensor(path))
            assert not wanted, f"not found in {fname} and its shards: {sorted(wanted)[:3]}"

    def close(self) -> None:
        self.sync_cb.on_train_end()
        self.async_cb.on_train_end()


def run_size(weight_bytes: int, rounds: int, work_root: Path) -> dict[str, float]:
    keras.utils.set_random_seed(0)
    model = build_model(weight_bytes)
    work = Path(tempfile.mkdtemp(prefix="keepbest-bench-", dir=work_root))
    try:
        bench = Bench(model, work)
        for _ in range(rounds):  # interleaved, so a slow moment of the disk hits every method alike
            for step in (bench.memcpy, bench.dd, bench.keepbest_async, bench.keepbest_sync,
                         bench.keras_weights, bench.keras_file):
                # Untimed: Keras does not fsync, and its dirty pages would otherwise be written back
                # (taking CPU and memory bandwidth) during whatever is measured next.
                gc.collect()
                os.sync()
                step()
        bench.close()
        out = {key: bench.median(key) for key in bench.times}
        out["state_bytes"] = bench.nbytes
        out["weight_bytes"] = sum(int(np.prod(v.shape)) * 4 for v in model.weights)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table(results: dict[str, dict[str, float]]) -> str:
    rows = [("Keras `model.save(.keras)`", "keras.keras save", "keras.keras save", "keras.keras restore"),
            ("Keras `save_weights(.weights.h5)`", "keras.weights.h5 save", "keras.weights.h5 save",
             "keras.weights.h5 restore"),
            ("keepbest sync", "keepbest sync save", "keepbest sync save", "keepbest restore"),
            ("keepbest async", "keepbest async stall", "keepbest async persist", "keepbest restore"),
            ("limit: memcpy of the state", "memcpy", None, None),
            ("limit: dd bs=64M conv=fsync", None, "dd", None),
            ("limit: safetensors mmap + assign", None, None, "safetensors mmap restore")]
    lines = []
    for label, r in results.items():
        lines.append(f"\n### {label} of weights ({r['state_bytes'] / GB:.2f} GB of state with Adam)\n")
        lines.append("| method | training stall (s) | persist (GB/s) | restore (s) |")
        lines.append("|---|---:|---:|---:|")
        for name, stall, persist, restore in rows:
            cells = [f"{r[stall]:.3f}" if stall else "",
                     f"{r['state_bytes'] / r[persist] / GB:.2f}" if persist else "",
                     f"{r[restore]:.3f}" if restore else ""]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(r: dict[str, float]) -> str:
    checks = [
        ("async stall <= 1.5x memcpy", r["keepbest async stall"] / r["memcpy"], "x memcpy", lambda v: v <= 1.5),
        (".keras stall >= 30x async stall", r["keras.keras save"] / r["keepbest async stall"], "x", lambda v: v >= 30),
        ("async persist >= 0.9x dd+fsync", r["dd"] / r["keepbest async persist"], "x dd", lambda v: v >= 0.9),
        ("restore <= 1.2x safetensors mmap", r["keepbest restore"] / r["safetensors mmap restore"], "x safetensors",
         lambda v: v <= 1.2),
        ("load_model >= 10x restore", r["keras.keras restore"] / r["keepbest restore"], "x", lambda v: v >= 10),
    ]
    return "\n".join(f"- {name}: {value:.2f}{unit} -> {'met' if ok(value) else 'MISSED'}"
                     for name, value, unit, ok in checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10MB,100MB,1GB", help="weight sizes, comma separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: the system temp folder)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args(argv)
    work_root = Path(args.dir or tempfile.gettempdir())
    results = {}
    for text in args.sizes.split(","):
        print(f"measuring {text} ...", flush=True)
        results[text] = run_size(parse_size(text), args.rounds, work_root)
    largest = list(results)[-1]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    report = "\n".join([
        "# Checkpoint speed: Keras vs keepbest",
        "",
        f"Generated by `benchmarks/checkpoint_speed.py --sizes {args.sizes} --rounds {args.rounds}`: "
        f"Keras {keras.__version__}, backend {keras.backend.backend()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} cores ({cpu}), writing to {work_root}. Medians of {args.rounds} interleaved rounds.",
        table(results),
        "",
        f"### Targets on the {largest} case",
        "",
        targets(results[largest]),
        "",
    ])
    print(report)
    Path(args.out).write_text(report)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
