"""How long checkpointing blocks training: Keras, Keras's OrbaxCheckpoint and keepbest, on JAX and torch.

Run (from the repository root, after ``python3 scripts/dev.py setup``; Orbax is a benchmark-only dependency):

    .venv/bin/python -m uv pip install --python .venv/bin/python 'orbax-checkpoint>=0.12,<0.13'
    .venv/bin/python benchmarks/checkpoint_speed.py                    # JAX and torch; 10 MB, 100 MB, 1 GB
    .venv/bin/python benchmarks/checkpoint_speed.py --backends jax --sizes 10MB --fit-compute 0   # a quick look

Each backend runs in a child process (Keras picks its backend at import). For each size an MLP
with that many bytes of float32 weights is trained one step with Adam (state = weights + 2
slots = 3x the weights). Then, in interleaved rounds (medians reported):

- **blocked per save**: how long training is held up by one checkpoint: the callback's own time
  (``on_epoch_end``) plus how much longer the real train steps taken until the save is durable
  take than the one before the save. The second part is where a zero-copy snapshot pays (on JAX a
  train step donates the variables' buffers, and a buffer something still reads cannot be donated,
  so XLA allocates and faults in new ones), and where a writer competing for the CPU does. The
  callback time alone is reported beside it.
- two cadences: *compute between saves* (the previous save is durable when the next is due) and
  *back to back* (three saves in a row with one train step between: the writer is behind);
- **durable**: from the callback's return until the checkpoint is on disk (keepbest fsyncs;
  Keras's own writers do not, so their figure flatters them);
- **restore** into the built model (weights and optimizer state; keepbest verifies every file's
  BLAKE3 digest first), or ``keras.models.load_model`` for ``.keras``;
- **fit overhead**: ``model.fit`` with simulated accelerator compute (the host thread sleeps
  ``--fit-compute`` seconds per epoch, a save per epoch) against the same fit without checkpoints.

Limits, measured in the same rounds on the same bytes: a NumPy memcpy of the state into a
preallocated buffer (one thread), ``dd bs=64M conv=fsync`` of the same size into the same folder,
and reading our safetensors files with the ``safetensors`` package (mmap) and assigning every variable.

The tables, with each target marked met or MISSED (and, for a missed keepbest target, the
profile of one keepbest save), go to ``--out`` (markdown).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
GB = 1e9


# -- the child: one backend ----------------------------------------------------------------------
def child(args: argparse.Namespace) -> int:
    os.environ.setdefault("KERAS_HOME", str(HERE.parent / ".keras_home"))
    import keras
    import numpy as np

    import keepbest.keras
    from keepbest.keras import ModelCheckpoint, _host
    from _measure import dd_seconds, drop, parse_size, timed

    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.WARNING)  # orbax logs every step at INFO
        OrbaxCheckpoint: Any = keras.callbacks.OrbaxCheckpoint
        import orbax.checkpoint  # noqa: F401
        orbax_error = None
    except ImportError as e:
        OrbaxCheckpoint, orbax_error = None, f"orbax-checkpoint is not installed ({e}); see the run command"

    def build_model(weight_bytes: int) -> keras.Model:
        width = 4096 if weight_bytes >= 512e6 else (2048 if weight_bytes >= 64e6 else 1024)
        layers = max(1, round(weight_bytes / (width * width * 4)))
        model = keras.Sequential([keras.Input((width,))] + [keras.layers.Dense(width) for _ in range(layers)])
        model.compile(optimizer="adam", loss="mse")
        return model

    class Bench:
        def __init__(self, model: keras.Model, work: Path) -> None:
            self.model, self.work = model, work
            width = model.inputs[0].shape[-1]
            self.x = np.random.default_rng(0).standard_normal((1, width)).astype("float32")
            self.step()
            self.variables = model.weights + model.optimizer.variables
            self.nbytes = sum(int(np.prod(v.shape)) * 4 for v in self.variables)
            self.host = [np.ones(v.shape, "float32") for v in self.variables]  # touched
            self.times: dict[str, list[float]] = {}
            self.epoch = 0
            self.callbacks = {"kb-sync": self._keepbest("kb-sync", False), "kb-async": self._keepbest("kb-async", True)}
            if OrbaxCheckpoint is not None:
                self.callbacks["orbax"] = self._attach(OrbaxCheckpoint(
                    str(work / "orbax"), monitor="loss", save_on_background=True, max_to_keep=1))
            for name in ("kb-async", "orbax"):  # a first save each: buffers, directories, compilation
                if name in self.callbacks:
                    self.save(name)
                    self.durable(name)

        def _attach(self, cb: Any) -> Any:
            cb.set_model(self.model)
            cb.on_train_begin()
            return cb

        def _keepbest(self, name: str, async_save: bool) -> ModelCheckpoint:
            return self._attach(ModelCheckpoint(str(self.work / name), monitor="loss", async_save=async_save))

        def step(self) -> float:
            return timed(lambda: self.model.train_on_batch(self.x, self.x))

        def record(self, key: str, seconds: float) -> None:
            self.times.setdefault(key, []).append(seconds)

        def save(self, name: str) -> float:
            self.epoch += 1
            cb = self.callbacks[name]
            return timed(lambda: cb.on_epoch_end(self.epoch, {"loss": 1.0 / self.epoch}))

        def durable(self, name: str) -> float:
            cb = self.callbacks[name]
            return timed(cb.wait if name.startswith("kb") else cb.wait_until_finished)

        # -- one measurement each; the rounds interleave them --------------------------------
        def memcpy(self) -> None:
            sources = [_host.view(v) for v in self.variables]
            self.record("memcpy", timed(lambda: [np.copyto(d, s) for d, s in zip(self.host, sources)]))

        def dd(self) -> None:
            self.record("dd", dd_seconds(self.work / "dd.bin", self.nbytes))

        def keras_file(self) -> None:
            target = self.work / "m.keras"
            base = self.step()
            self.record(".keras callback", timed(lambda: self.model.save(target)))
            self.record(".keras blocked", self.times[".keras callback"][-1] + self.step() - base)
            self.record(".keras restore", timed(lambda: keras.models.load_model(target)))
            drop(target)

        def keras_weights(self) -> None:
            target = self.work / "m.weights.h5"
            self.record(".weights.h5 callback", timed(lambda: self.model.save_weights(target)))
            self.record(".weights.h5 restore", timed(lambda: self.model.load_weights(target)))
            drop(target)

        def busy(self, name: str) -> bool:
            cb = self.callbacks[name]
            if name == "orbax":
                return bool(cb.checkpointer.is_saving_in_progress())
            return cb._writer.in_flight is not None

        def compute_cadence(self, name: str) -> None:
            base = statistics.median([self.step(), self.step()])
            callback = self.save(name)
            returned = time.perf_counter()
            # Every train step taken while the save is still being written pays for it (its writer's CPU,
            # memory bandwidth, or buffers it holds): the extra time of all of them counts, not only the first.
            excess, steps = self.step() - base, 1
            while self.busy(name) and steps < 30:
                excess, steps = excess + self.step() - base, steps + 1
            self.durable(name)
            self.record(f"{name} callback", callback)
            self.record(f"{name} blocked", callback + max(0.0, excess))  # (noise can make the extra negative)
            self.record(f"{name} steps", steps)
            self.record(f"{name} durable", time.perf_counter() - returned)

        def back_to_back(self, name: str) -> None:
            base = statistics.median([self.step(), self.step()])
            for i in range(3):
                callback = self.save(name)
                excess = self.step() - base
                if i:  # the first of the three found the writer idle
                    self.record(f"{name} b2b callback", callback)
                    self.record(f"{name} b2b blocked", callback + max(0.0, excess))
            self.durable(name)

        def restores(self) -> None:
            self.record("kb restore", timed(lambda: keepbest.keras.load_weights(self.model, self.work / "kb-sync")))
            self.record("safetensors restore", timed(lambda: self._safetensors_restore(self.work / "kb-sync")))
            if "orbax" in self.callbacks:
                self.record("orbax restore", timed(lambda: self.model.load_weights(str(self.work / "orbax"))))

        def _safetensors_restore(self, folder: Path) -> None:
            from safetensors import safe_open

            from keepbest.keras._state import OPTIMIZER_FILE, WEIGHTS_FILE, unique_paths

            for fname, variables in ((WEIGHTS_FILE, self.model.weights),
                                     (OPTIMIZER_FILE, self.model.optimizer.variables)):
                wanted = dict(zip(unique_paths(variables), variables))
                with safe_open(str(folder / fname), framework="numpy") as f:
                    shards = json.loads((f.metadata() or {}).get("keepbest.shards", "[]"))
                for name in [fname, *shards]:
                    with safe_open(str(folder / name), framework="numpy") as f:
                        for path in f.keys():
                            wanted.pop(path).assign(f.get_tensor(path))
                assert not wanted, f"not found in {fname} and its shards: {sorted(wanted)[:3]}"

        def profile(self) -> list[str]:
            """The functions one keepbest async save spends its callback time in (cumulative, top 12)."""
            self.durable("kb-async")
            self.step()
            profiler = cProfile.Profile()
            profiler.enable()
            self.save("kb-async")
            profiler.disable()
            self.durable("kb-async")
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(12)
            lines = [line.rstrip() for line in out.getvalue().splitlines() if line.strip()]
            start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
            return lines[start:]

        def close(self) -> None:
            for cb in self.callbacks.values():
                cb.on_train_end()

    def run_size(weight_bytes: int) -> dict[str, Any]:
        keras.utils.set_random_seed(0)
        model = build_model(weight_bytes)
        work = Path(tempfile.mkdtemp(prefix="keepbest-bench-", dir=args.dir))
        try:
            bench = Bench(model, work)
            asyncs = [n for n in ("kb-async", "orbax") if n in bench.callbacks]
            steps: list[Callable[[], None]] = [bench.memcpy, bench.dd]
            steps += [lambda n=n: bench.compute_cadence(n) for n in ["kb-sync", *asyncs]]
            steps += [lambda n=n: bench.back_to_back(n) for n in asyncs]
            steps += [bench.keras_weights, bench.keras_file, bench.restores]
            for _ in range(args.rounds):  # interleaved: a slow moment of the disk hits every method alike
                for step in steps:
                    gc.collect()
                    os.sync()  # Keras does not fsync: its dirty pages are written back here, untimed
                    step()
            profile = bench.profile()
            bench.close()
            out: dict[str, Any] = {key: statistics.median(v) for key, v in bench.times.items()}
            out.update(state_bytes=bench.nbytes, profile=profile,
                       weight_bytes=sum(int(np.prod(v.shape)) * 4 for v in model.weights))
            return out
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def fit_overhead(weight_bytes: int) -> dict[str, Any]:
        """Seconds of ``fit`` per method, and the same fit without checkpoints, interleaved."""
        steps = 4

        class Compute(keras.callbacks.Callback):  # the accelerator is busy: the host thread waits
            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                time.sleep(args.fit_compute / steps)

        class Clock(keras.callbacks.Callback):  # placed before and after the checkpoint callback
            def __init__(self) -> None:
                super().__init__()
                self.at = 0.0

            def on_train_end(self, logs: Any = None) -> None:
                self.at = time.perf_counter()

        keras.utils.set_random_seed(0)
        model = build_model(weight_bytes)
        width = model.inputs[0].shape[-1]
        x = np.random.default_rng(1).standard_normal((steps, width)).astype("float32")
        work = Path(tempfile.mkdtemp(prefix="keepbest-fit-", dir=args.dir))
        methods: dict[str, Callable[[Path], list[Any]]] = {"none": lambda d: []}
        if OrbaxCheckpoint is not None:
            methods["orbax"] = lambda d: [OrbaxCheckpoint(str(d / "orbax"), monitor="loss",
                                                          save_on_background=True, max_to_keep=1)]
        # keepbest last: whatever a run leaves behind (page cache, freed memory) weighs on the next one.
        methods["kb-async"] = lambda d: [ModelCheckpoint(str(d / "kb"), monitor="loss", async_save=True)]
        times: dict[str, list[float]] = {}
        try:
            model.fit(x, x, batch_size=1, epochs=1, verbose=0)  # compiled once, before any is timed
            for r in range(args.fit_rounds):
                for name, make in methods.items():
                    folder = work / f"{name}-{r}"
                    folder.mkdir()
                    before, after = Clock(), Clock()
                    callbacks = [Compute(), before, *make(folder), after]
                    gc.collect()
                    os.sync()
                    times.setdefault(name, []).append(timed(lambda: model.fit(
                        x, x, batch_size=1, epochs=args.fit_epochs, verbose=0, callbacks=callbacks)))
                    times.setdefault(f"{name} end", []).append(after.at - before.at)
                    shutil.rmtree(folder, ignore_errors=True)
            return {"epochs": args.fit_epochs, "compute_s": args.fit_compute,
                    **{name: statistics.median(v) for name, v in times.items()}}
        finally:
            shutil.rmtree(work, ignore_errors=True)

    results: dict[str, Any] = {"backend": keras.backend.backend(), "keras": keras.__version__,
                               "orbax_error": orbax_error, "sizes": {}}
    if OrbaxCheckpoint is not None:
        results["orbax"] = orbax.checkpoint.__version__
    for text in filter(None, args.sizes.split(",")):
        print(f"[{results['backend']}] measuring {text} ...", flush=True)
        results["sizes"][text] = run_size(parse_size(text))
    if args.fit_compute > 0:
        print(f"[{results['backend']}] fit overhead at {args.fit_size} ...", flush=True)
        results["fit"] = {"size": args.fit_size, **fit_overhead(parse_size(args.fit_size))}
    Path(args.json).write_text(json.dumps(results))
    return 0


# -- the parent: every backend, one report -------------------------------------------------------
ROWS = [  # label, blocked (compute cadence), callback, back to back (blocked), durable, restore
    ("Keras `model.save(.keras)`", ".keras blocked", ".keras callback", None, ".keras callback", ".keras restore"),
    ("Keras `save_weights(.weights.h5)`", None, ".weights.h5 callback", None, ".weights.h5 callback",
     ".weights.h5 restore"),
    ("keepbest sync", "kb-sync blocked", "kb-sync callback", None, "kb-sync callback", "kb restore"),
    ("keepbest `async_save=True`", "kb-async blocked", "kb-async callback", "kb-async b2b blocked",
     "kb-async durable", "kb restore"),
    ("Keras `OrbaxCheckpoint` (background)", "orbax blocked", "orbax callback", "orbax b2b blocked",
     "orbax durable", "orbax restore"),
    ("limit: memcpy of the state (1 thread)", None, "memcpy", None, None, None),
    ("limit: dd bs=64M conv=fsync", None, None, None, "dd", None),
    ("limit: safetensors mmap + assign", None, None, None, None, "safetensors restore"),
]


def size_table(r: dict[str, Any]) -> list[str]:
    def cell(key: str | None, fmt: Callable[[float], str] = lambda v: f"{v * 1e3:.0f}") -> str:
        return fmt(r[key]) if key and key in r else ""

    lines = ["| method | blocked per save (ms) | of which the callback (ms) | back to back: blocked (ms) "
             "| durable (s) | restore (s) |", "|---|---:|---:|---:|---:|---:|"]
    for label, blocked, callback, b2b, durable, restore in ROWS:
        if not any(k in r for k in (blocked, callback, durable, restore) if k):
            continue
        lines.append(f"| {label} | {cell(blocked)} | {cell(callback)} | {cell(b2b)} | "
                     f"{cell(durable, lambda v: f'{v:.2f}')} | {cell(restore, lambda v: f'{v:.3f}')} |")
    return lines


def checks(r: dict[str, Any]) -> list[tuple[str, float, str, bool | None, bool]]:
    """(target, value, unit, met (None: a figure for reference, no target), about keepbest) for one size."""
    kb = r["kb-async blocked"]
    out = [("async blocked <= 1.0x memcpy", kb / r["memcpy"], "x memcpy", kb <= r["memcpy"], True),
           (".keras blocked >= 30x async blocked", r[".keras blocked"] / kb, "x", r[".keras blocked"] >= 30 * kb,
            True),
           ("load_model >= 10x keepbest restore", r[".keras restore"] / r["kb restore"], "x",
            r[".keras restore"] >= 10 * r["kb restore"], True)]
    if "orbax blocked" in r:
        out.insert(0, ("Orbax blocked >= 1.5x keepbest async blocked", r["orbax blocked"] / kb, "x",
                       r["orbax blocked"] >= 1.5 * kb, True))
        out.append(("Orbax callback alone vs keepbest async blocked (for reference)",
                    r["orbax callback"] / kb, "x", None, False))
        out.append(("keepbest restore faster than Orbax restore", r["orbax restore"] / r["kb restore"], "x",
                    r["kb restore"] < r["orbax restore"], True))
    return out


def report(results: list[dict[str, Any]], argv: list[str]) -> str:
    cpu = ""
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    first = results[0]
    lines = ["# Checkpoint speed: Keras, Keras's OrbaxCheckpoint and keepbest", "",
             f"Generated by `benchmarks/checkpoint_speed.py {' '.join(argv)}`: Keras {first['keras']}, "
             f"orbax-checkpoint {first.get('orbax', 'missing')}, Python {platform.python_version()}, "
             f"{os.cpu_count()} cores ({cpu}), {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} "
             "GiB. Medians of interleaved rounds. *Blocked per save* is the callback plus how much longer every "
             "train step taken until the save is durable takes than the step before the save (see the script's "
             "docstring); *back to back* is three saves with one train step between them."]
    for r in results:
        lines += ["", f"## Backend: {r['backend']}"]
        if r.get("orbax_error"):
            lines += ["", f"Orbax rows missing: {r['orbax_error']}"]
        for label, s in r["sizes"].items():
            lines += ["", f"### {label} of weights ({s['state_bytes'] / GB:.2f} GB of state with Adam)", ""]
            lines += size_table(s)
            lines += [""]
            targeted = s["weight_bytes"] >= 50e6  # the targets are set at 100 MB and 1 GB
            missed_kb = False
            for name, value, unit, ok, ours in checks(s):
                verdict = ("for reference, no target" if ok is None else "met" if ok else "MISSED") \
                    if targeted else "no target at this size"
                lines.append(f"- {name}: {value:.2f}{unit} -> {verdict}")
                missed_kb |= targeted and ours and ok is False
            if missed_kb:
                lines += ["", "Where the time goes: the callback's part of *blocked* is profiled below; the rest is "
                          "train steps slowed while the background writer works on the same cores (its work, done "
                          "on the training thread, is the *keepbest sync* row).", "",
                          "Profile of one keepbest async save at this size (the callback, cumulative):", "",
                          "```", *s["profile"], "```"]
        fit = r.get("fit")
        if fit:
            base = fit["none"]
            lines += ["", f"### fit overhead: {fit['size']} of weights, {fit['epochs']} epochs of "
                      f"{fit['compute_s']:.0f} s simulated compute, a save per epoch", "",
                      "| method | fit (s) | overhead | of which `on_train_end` (the last save made durable) |",
                      "|---|---:|---:|---:|", f"| no checkpoints | {base:.1f} | | |"]
            for name, label in (("kb-async", "keepbest `async_save=True`"), ("orbax", "Keras `OrbaxCheckpoint`")):
                if name in fit:
                    lines.append(f"| {label} | {fit[name]:.1f} | {fit[name] - base:+.2f} s "
                                 f"({(fit[name] - base) / base:+.2%}) | {fit[name + ' end']:.2f} s |")
            kb = fit["kb-async"] - base
            lines += ["", f"- keepbest overhead <= 2%: {kb / base:+.2%} -> {'met' if kb <= 0.02 * base else 'MISSED'}"]
            if "orbax" in fit:
                orbax = fit["orbax"] - base
                lines.append(f"- keepbest overhead below Orbax's: {kb:+.2f} s vs {orbax:+.2f} s -> "
                             f"{'met' if kb < orbax else 'MISSED'}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="jax,torch", help="Keras backends, comma separated")
    parser.add_argument("--sizes", default="10MB,100MB,1GB", help="weight sizes, comma separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fit-size", default="1GB", help="weight size of the fit-overhead run")
    parser.add_argument("--fit-compute", type=float, default=30.0,
                        help="seconds of simulated compute per epoch (a save per epoch); 0 skips the fit run")
    parser.add_argument("--fit-epochs", type=int, default=4)
    parser.add_argument("--fit-rounds", type=int, default=1)
    parser.add_argument("--dir", default=None, help="where to write (default: the system temp folder)")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    given = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(given)
    if args.child:
        return child(args)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": os.pathsep.join(
                [str(HERE), os.environ.get("PYTHONPATH", "")])}
            merged: dict[str, Any] = {}
            # A process per size, and one for the fit: no size measures in memory another one left behind.
            runs = [["--sizes", size, "--fit-compute", "0"] for size in args.sizes.split(",")]
            if args.fit_compute > 0:
                runs.append(["--sizes", "", "--fit-compute", str(args.fit_compute)])
            for i, run in enumerate(runs):
                out = Path(tmp) / f"{backend}-{i}.json"
                rc = subprocess.run([sys.executable, __file__, *given, *run, "--child", "--json", str(out)],
                                    env=env).returncode
                if rc != 0:
                    print(f"the {backend} run {' '.join(run)} failed (exit {rc})", file=sys.stderr)
                    return rc
                part = json.loads(out.read_text())
                sizes = {**merged.get("sizes", {}), **part.pop("sizes")}
                merged.update(part, sizes=sizes)
            results.append(merged)
    text = report(results, given)
    print(text)
    Path(args.out).write_text(text)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
