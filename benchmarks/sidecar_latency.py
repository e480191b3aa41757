"""The sidecar's reaction time: from a checkpoint's commit to the start of its evaluation.

Run (from the repository root, after ``python3 scripts/dev.py setup``):

    .venv/bin/python benchmarks/sidecar_latency.py                      # 24 saves, one every 1.5 s, both modes
    .venv/bin/python benchmarks/sidecar_latency.py --saves 40 --cadence 1 --modes inotify

Per mode, two processes on this machine share one local folder:

- the *training* process: Keras 3 on JAX fits an MLP (64 -> H -> H -> 10,
  ``--hidden``) on scikit-learn's bundled ``load_digits`` and saves every epoch
  with ``keepbest.keras.ModelCheckpoint("ckpt-{epoch:04d}", save_weights_only=True)``.
  Epoch ``e`` starts at ``e * --cadence`` seconds plus a random ``[0, --jitter)``
  (seeded), so checkpoints are committed at a steady rate while real training
  runs between them, and not in step with the sidecar's poll period (a fixed
  1.5 s cadence against a 0.5 s poll would see the same phase every time);
- the *sidecar* process: ``keepbest.keras.SidecarEvaluator`` with its defaults
  follows the folder and evaluates each new checkpoint on the held-out digits.
  It is started first and the training process only once it waits.

Which event is the commit: the checkpoint is a folder, staged as a hidden
``.keepbest-tmp-*`` sibling with its ``manifest.json`` written last, then
renamed onto ``ckpt-NNNN`` (``LocalStore._publish_dir``). That rename is
what makes it visible to any reader, so the training process times it:
``time.time()`` right after ``os.rename`` returns (a pass-through spy on the
``os`` module of ``keepbest.store.local``; nothing else changes). The history
record's ``time`` (stamped after the folder fsync that follows) is reported
beside it as a cross-check.

The start of the evaluation is ``time.time()`` in ``on_test_begin`` of a
Keras callback passed through ``SidecarEvaluator(callbacks=[...])``. Both
processes are on one host, so their wall clocks agree. The sidecar also
stamps the steps in between (when ``Follower.next`` returns the checkpoint,
the lease update, verification and loading of the weights), which split the
reaction into where its time goes.

Modes: ``inotify`` is the default configuration (Linux file events through
the store's ``watch``). ``poll`` is the same sidecar with file events
unavailable (``keepbest.store._watch`` built without libc, which is what
happens off Linux or when the process is out of inotify instances), so it
looks every ``--poll-interval`` seconds (the default 0.5 s).

A checkpoint committed while the sidecar was still busy with the previous one
measures a queue, not a reaction: such checkpoints are counted and shown
apart, the figures are those of checkpoints that found the sidecar waiting.
The report goes to ``--out`` (markdown) and is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("KERAS_HOME", str(Path(__file__).resolve().parent.parent / ".keras_home"))

TARGET_S = 0.2  # issue 18: median reaction with inotify
SERIES = "ckpt-{epoch:04d}"


# -- shared by both processes -----------------------------------------------------------------------
def digits() -> tuple:
    from sklearn.datasets import load_digits

    data = load_digits()
    x, y = (data.data / 16.0).astype("float32"), data.target.astype("int32")
    return (x[:1500], y[:1500]), (x[1500:], y[1500:])


def build_model(hidden: int):
    import keras

    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(hidden, activation="relu"),
                              keras.layers.Dense(hidden, activation="relu"), keras.layers.Dense(10)])
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


# -- the training process ---------------------------------------------------------------------------
def run_writer(args: argparse.Namespace) -> None:
    import keras

    import keepbest.keras
    from keepbest import history, store as stores
    from keepbest.store import local

    folder = Path(args.folder)
    commits: list[dict] = []

    class RenameSpy:
        """``os`` for keepbest.store.local: times the rename that publishes a checkpoint folder."""

        def __getattr__(self, attr: str):
            return getattr(os, attr)

        def rename(self, src, dst, *a, **k):
            os.rename(src, dst, *a, **k)
            t = time.time()
            dst = Path(dst)
            if dst.parent == folder and not dst.name.startswith(".keepbest"):
                commits.append({"name": dst.name, "t": t})

    local.os = RenameSpy()

    class Pace(keras.callbacks.Callback):
        """Starts epoch ``e`` at ``start + e * cadence + U(0, jitter)``: a save about every ``cadence`` seconds."""

        def on_train_begin(self, logs=None):
            self.start = time.time() + 0.5
            self.rng = random.Random(args.seed)

        def on_epoch_begin(self, epoch, logs=None):
            due = self.start + epoch * args.cadence + self.rng.uniform(0.0, args.jitter)
            time.sleep(max(0.0, due - time.time()))

    (x, y), _ = digits()
    model = build_model(args.hidden)
    model.fit(x, y, batch_size=128, epochs=args.saves, verbose=0, callbacks=[
        Pace(), keepbest.keras.ModelCheckpoint(str(folder / SERIES), save_weights_only=True)])
    stamped = {e["name"]: e["time"] for e in history.read(stores.open(folder), SERIES)
               if e.get("event") == "committed"}
    size = sum(f.stat().st_size for f in (folder / commits[-1]["name"]).iterdir()) if commits else 0
    Path(args.log).write_text(json.dumps({"commits": commits, "history": stamped, "bytes": size}))


# -- the sidecar process ----------------------------------------------------------------------------
def run_sidecar(args: argparse.Namespace) -> None:
    import keras

    from keepbest.store import _watch

    if args.mode == "poll":
        _watch._libc = None  # as off Linux: no file events, a look every poll_interval
    from keepbest.keras import SidecarEvaluator

    events: list[tuple] = []  # (time.time(), what, detail)

    def stamp(what: str, detail: object = None) -> None:
        events.append((time.time(), what, detail))

    class Started(keras.callbacks.Callback):
        def on_test_begin(self, logs=None):
            stamp("test_begin")

        def on_test_end(self, logs=None):
            stamp("test_end")

    _, (x_val, y_val) = digits()
    evaluator = SidecarEvaluator(build_model(args.hidden), (x_val, y_val), args.folder, callbacks=[Started()],
                                 verbose=0, poll_interval=args.poll_interval)
    follower = evaluator.follower
    uses_events = follower._watch.uses_events
    if uses_events != (args.mode == "inotify"):
        raise SystemExit(f"mode {args.mode}: the watch uses_events={uses_events}")
    ready = Path(args.ready)

    def wrap(obj, attr: str, before: str | None, after: str | None, detail=None):
        inner = getattr(obj, attr)

        def wrapped(*a, **k):
            if before:
                stamp(before)
            out = inner(*a, **k)
            if after:
                stamp(after, detail(out, *a) if detail else None)
            return out

        setattr(obj, attr, wrapped)

    wait = follower._watch.wait

    def first_wait(timeout: float) -> bool:
        if not ready.exists():
            ready.write_text("waiting")  # the training process starts now
        return wait(timeout)

    follower._watch.wait = first_wait
    wrap(follower._watch, "wait", None, "wake")
    wrap(follower, "next", "ask", "due", lambda ckpt, *a: None if ckpt is None else ckpt.name)
    wrap(follower, "begin", None, "begun")
    wrap(follower, "verify", "verify0", "verified")
    wrap(follower, "load", "load0", "loaded", lambda ok, *a: ok)
    evaluator.start()
    Path(args.log).write_text(json.dumps({"events": events, "uses_events": uses_events,
                                          "stop_reason": evaluator.stop_reason}))


# -- the driver -------------------------------------------------------------------------------------
def child(role: str, args: argparse.Namespace, **extra: str) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--role", role, "--saves", str(args.saves), "--cadence", str(args.cadence),
           "--hidden", str(args.hidden), "--poll-interval", str(args.poll_interval), "--jitter", str(args.jitter),
           "--seed", str(args.seed)]
    for k, v in extra.items():
        cmd += [f"--{k}", v]
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def run_mode(mode: str, args: argparse.Namespace, work_root: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"sidecar-latency-{mode}-", dir=work_root))
    folder, ready = work / "ckpt", work / "ready"
    logs = {"writer": work / "writer.json", "sidecar": work / "sidecar.json"}
    limit = args.saves * (args.cadence + args.jitter) + 120
    sidecar = child("sidecar", args, folder=str(folder), mode=mode, ready=str(ready), log=str(logs["sidecar"]))
    deadline = time.monotonic() + 120
    while not ready.exists():
        if sidecar.poll() is not None or time.monotonic() > deadline:
            sidecar.kill()
            raise SystemExit(f"{mode}: the sidecar did not start (exit {sidecar.returncode})")
        time.sleep(0.05)
    writer = child("writer", args, folder=str(folder), log=str(logs["writer"]))
    for name, proc in (("writer", writer), ("sidecar", sidecar)):
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            writer.kill()
            sidecar.kill()
            raise SystemExit(f"{mode}: the {name} process ran over {limit:.0f} s")
        if code:
            writer.kill()
            sidecar.kill()
            raise SystemExit(f"{mode}: the {name} process failed (exit {code})")
    w = json.loads(logs["writer"].read_text())
    s = json.loads(logs["sidecar"].read_text())
    result = analyse(w, s)
    result["uses_events"], result["stop_reason"], result["bytes"] = s["uses_events"], s["stop_reason"], w["bytes"]
    if not args.keep:
        import shutil

        shutil.rmtree(work)
    return result


def analyse(w: dict, s: dict) -> dict:
    """Per checkpoint: commit -> due -> lease -> loaded -> on_test_begin, and whether the sidecar was waiting."""
    commits = {c["name"]: c["t"] for c in w["commits"]}
    rows, current = [], None
    for t, what, detail in s["events"]:
        if what == "ask":
            asked = t
        elif what == "due" and detail is not None:
            current = {"name": detail, "asked": asked, "due": t, "verify": 0.0}
        elif current is None:
            continue
        elif what == "begun":
            current["begun"] = t
        elif what == "verify0":
            v0 = t
        elif what == "verified":
            current["verify"] += t - v0
        elif what == "loaded":
            current["loaded"] = t
        elif what == "test_begin":
            current["test_begin"] = t
            rows.append(current)
            current = None
    out = []
    for r in rows:
        commit = commits.get(r["name"])
        if commit is None:  # not a commit of this run
            continue
        out.append({
            "name": r["name"], "idle": r["asked"] <= commit,  # the sidecar was already waiting for it
            "reaction": r["test_begin"] - commit,
            "detect": r["due"] - commit, "lease": r["begun"] - r["due"], "verify": r["verify"],
            "restore": r["loaded"] - r["begun"] - r["verify"], "setup": r["test_begin"] - r["loaded"],
            "history_gap": w["history"].get(r["name"], commit) - commit,
        })
    missing = sorted(set(commits) - {r["name"] for r in out})
    return {"rows": out, "commits": len(commits), "missing": missing}


def q(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(p * (len(values) - 1))))]


def ms(x: float) -> str:
    return f"{x * 1000:.0f} ms"


def summary(mode: str, res: dict) -> tuple[str, str, dict]:
    idle = [r for r in res["rows"] if r["idle"]]
    busy = [r for r in res["rows"] if not r["idle"]]
    react = [r["reaction"] for r in idle]
    fig = {"median": statistics.median(react), "p90": q(react, 0.9), "max": max(react), "n": len(react)} \
        if react else {}
    line = (f"| {mode} | {res['commits']} | {len(idle)} | {len(busy)} | "
            + (" | ".join(ms(fig[k]) for k in ("median", "p90", "max")) if fig else "- | - | -") + " |")
    parts = ("detect", "lease", "verify", "restore", "setup")
    split = f"| {mode} | " + " | ".join(ms(statistics.median([r[p] for r in idle])) if idle else "-"
                                        for p in parts) + " |"
    return line, split, fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--saves", type=int, default=24, help="checkpoints per mode (one per epoch)")
    parser.add_argument("--cadence", type=float, default=1.5, help="seconds between saves")
    parser.add_argument("--jitter", type=float, default=0.5, help="random extra delay (s) before each epoch")
    parser.add_argument("--seed", type=int, default=0, help="seeds the jitter")
    parser.add_argument("--hidden", type=int, default=1024,
                        help="width of the 2 hidden layers (1024: 4.5 MB of weights, 13.5 MB with Adam's state)")
    parser.add_argument("--modes", default="inotify,poll", help="inotify, poll, or both (comma separated)")
    parser.add_argument("--poll-interval", type=float, default=0.5, help="the sidecar's poll_interval")
    parser.add_argument("--dir", default=None, help="where to write (default: the system temp folder)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("SIDECAR_RESULTS.md")))
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint folders and logs")
    parser.add_argument("--role", choices=("driver", "writer", "sidecar"), default="driver", help=argparse.SUPPRESS)
    for hidden in ("folder", "mode", "ready", "log"):
        parser.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "writer":
        run_writer(args)
        return 0
    if args.role == "sidecar":
        run_sidecar(args)
        return 0

    import keras

    import keepbest

    work_root = Path(args.dir or tempfile.gettempdir())
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(modes) <= {"inotify", "poll"}:
        parser.error(f"--modes takes inotify and/or poll. Received: {args.modes}")
    results = {}
    load_before = os.getloadavg()
    for mode in modes:
        print(f"measuring {mode}: {args.saves} saves, one every {args.cadence:g} s ...", flush=True)
        results[mode] = run_mode(mode, args, work_root)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    lines, splits, figs = [], [], {}
    for mode, res in results.items():
        line, split, figs[mode] = summary(mode, res)
        lines.append(line)
        splits.append(split)
    nbytes = next(iter(results.values()))["bytes"]
    verdict = []
    if "inotify" in figs and figs["inotify"]:
        met = figs["inotify"]["median"] <= TARGET_S
        verdict.append(f"Target (median <= {TARGET_S:g} s with inotify): **{'met' if met else 'MISSED'}** "
                       f"({ms(figs['inotify']['median'])}, over {figs['inotify']['n']} checkpoints).")
    else:
        verdict.append("Target (median <= 0.2 s with inotify): not measured (inotify was not run).")
    gaps = [r["history_gap"] for res in results.values() for r in res["rows"]]
    detail = []
    for mode, res in results.items():
        detail.append(f"\n### {mode}: each checkpoint\n\n| checkpoint | sidecar | reaction | detect | lease | "
                      "verify | restore | setup |\n|---|---|---|---|---|---|---|---|")
        for r in res["rows"]:
            detail.append(f"| {r['name']} | {'waiting' if r['idle'] else 'busy'} | " + " | ".join(
                ms(r[k]) for k in ("reaction", "detect", "lease", "verify", "restore", "setup")) + " |")
        every = [r["reaction"] for r in res["rows"]]
        if every:
            first = res["rows"][0]
            detail.append(f"\nAll {len(every)} evaluated (busy ones included): median {ms(statistics.median(every))}, "
                          f"max {ms(max(every))}. The first checkpoint ({first['name']}: {ms(first['reaction'])}, "
                          f"of which restore {ms(first['restore'])}, setup {ms(first['setup'])}) pays the sidecar's "
                          "one-off costs (its first load and first `evaluate`, whose test step is compiled after "
                          "`on_test_begin`).")
            busy = [r["name"] for r in res["rows"] if not r["idle"]]
            if busy:
                detail.append(f"Committed while the sidecar was still evaluating the one before: {', '.join(busy)}.")
        if res["missing"]:
            detail.append(f"\nNot evaluated: {', '.join(res['missing'])}.")
        detail.append(f"\nThe sidecar stopped: {res['stop_reason']}.")
    shown = ("saves", "cadence", "jitter", "hidden", "modes", "poll_interval")
    cmd = "benchmarks/sidecar_latency.py" + "".join(f" --{k.replace('_', '-')} {getattr(args, k)}" for k in shown)
    report = "\n".join([
        "# Sidecar reaction time: from a checkpoint's commit to the start of its evaluation",
        "",
        f"Generated by `{cmd}`: keepbest {keepbest.__version__}, Keras {keras.__version__} "
        f"on {keras.backend.backend()} (CPU), Python {platform.python_version()}, {os.cpu_count()} cores ({cpu}), "
        f"writing to {work_root} (local disk). A training process saves `ckpt-{{epoch:04d}}` "
        f"({nbytes / 1e6:.1f} MB: weights and Adam's state) every {args.cadence:g} s (+ up to {args.jitter:g} s "
        f"of random delay); a `SidecarEvaluator` (its defaults, "
        f"poll_interval {args.poll_interval:g} s) in another process evaluates each on 297 held-out digits. "
        f"Load average (1 min): {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after.",
        "",
        "Reaction = `on_test_begin` of the evaluation minus the rename that committed the checkpoint, for the "
        "checkpoints committed while the sidecar was waiting (\"busy\": committed while it still evaluated the "
        "previous one, a queue rather than a reaction).",
        "",
        "| mode | commits | sidecar waiting | sidecar busy | median | p90 | max |",
        "|---|---|---|---|---|---|---|",
        *lines,
        "",
        verdict[0],
        "",
        "### Where the time goes (medians, checkpoints that found the sidecar waiting)",
        "",
        "- detect: commit -> `Follower.next` returns it (woken by the watch, then the folder listed);",
        "- lease: `Follower.begin` (pins the checkpoint in the evaluator's lease record, written durably);",
        "- verify: re-hashing its files; restore: loading the weights into the model (and the check that it "
        "is still the committed version);",
        "- setup: from the loaded weights to Keras's `on_test_begin` (`model.evaluate` preparing its data).",
        "",
        "| mode | detect | lease | verify | restore | setup |",
        "|---|---|---|---|---|---|",
        *splits,
        "",
        f"Cross-check: the history record's commit time lies "
        f"{f'{statistics.median(gaps) * 1000:.1f} ms' if gaps else '-'} "
        "(median) after the rename (the folder fsync in between).",
        *detail,
        "",
    ])
    print(report)
    Path(args.out).write_text(report)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
