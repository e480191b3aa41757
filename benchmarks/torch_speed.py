"""Training stall, persist throughput and restore time of a PyTorch training state: torch.save, torch DCP and
keepbest, next to the machine's limits.

Run (from the repository root, after ``python3 scripts/dev.py setup``):

    .venv/bin/python benchmarks/torch_speed.py                             # 10 MB, 100 MB, 1 GB of weights
    .venv/bin/python benchmarks/torch_speed.py --sizes 10MB --rounds 2     # a quick look

For each size an MLP (``torch.nn.Sequential`` of float32 ``Linear`` layers)
with about that many bytes of weights is trained one step with
``torch.optim.AdamW``, so the state is weights + ``exp_avg`` + ``exp_avg_sq``
(3x the weights). ``app_state = {"model": model, "optimizer": opt}``. Each way
of checkpointing it is timed in interleaved rounds (one of each method per
round, so a slow moment of the disk or of a neighbour hits every method
alike); medians are reported:

- stall: how long the training thread is blocked by one save. For
  ``torch.save``, keepbest sync and ``dcp.save`` that is the whole call. For
  keepbest async it is the ``Checkpointer.save`` call, in steady state (a
  warm-up save allocated the staging buffers; the previous save is waited for,
  untimed, so the figure does not include back-pressure). For
  ``dcp.async_save`` it is the call until it returns its future (DCP's default
  stager copies the state into fresh CPU tensors on every call);
- persist: state bytes / time from the call until the checkpoint is durable
  (``handle.result()`` / ``future.result()`` for the async ones). keepbest
  and DCP (``FileSystemWriter(sync_files=True)``, its default) fsync;
  ``torch.save`` does not, so its figure is only until the bytes are in the
  page cache and flatters it;
- restore: into the already built model and optimizer. ``torch.load(mmap=True,
  weights_only=True)`` then ``load_state_dict`` on both; ``Checkpointer.restore``
  (verifies every file's BLAKE3 digest, then ``load_state_dict``); DCP:
  ``get_state_dict``, ``dcp.load`` into it, ``set_state_dict``. The async rows
  write the same files as their sync rows, so their restore is the sync one.
  Every restore reads a checkpoint just written, mostly from the page cache.

Limits, measured in the same rounds on the same bytes: a memcpy of the state
into preallocated CPU buffers (``Tensor.copy_`` and ``np.copyto``), and
``dd if=/dev/zero bs=64M conv=fsync`` of the state's size into the same folder.

Targets per size: keepbest async stall <= 1.0x the faster memcpy of the state,
and keepbest restore <= torch.load(mmap=True) + load_state_dict, from the
medians of the table. Memory bandwidth on a shared VM can drift by several
times over a few seconds, so each round runs the memcpy right before the async
save and the median of those per-round ratios is printed next to the target.
Where a target is missed, a short profile of it follows (digest verification
timed apart from the rest, and the top cProfile entries of one call).

Every checkpoint is deleted (untimed) once it was measured, so the folder holds
at most one of each at a time. The table is printed and written to ``--out``
(markdown).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import keepbest
from keepbest.torch import Checkpointer, _state
from _measure import dd_seconds, drop, parse_size, timed  # noqa: E402 - beside this script

GB = 1e9
MS = 1e3

# dcp.save / load / async_save without a process group run as a single process, and say so on every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def build(weight_bytes: int) -> tuple[torch.nn.Sequential, torch.optim.AdamW]:
    """An MLP of square Linear layers holding about ``weight_bytes`` of float32 weights, AdamW stepped once."""
    width = 4096 if weight_bytes >= 512e6 else (2048 if weight_bytes >= 64e6 else 1024)
    layers = max(1, round(weight_bytes / (width * width * 4)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(8, width)
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)  # the gradients are not part of the state
    return model, opt


def state_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor of the training state: the module's, then each parameter's optimizer slots and step."""
    out = list(model.state_dict().values())
    for slots in opt.state_dict()["state"].values():
        out += [slots[k] for k in sorted(slots) if isinstance(slots[k], torch.Tensor)]  # a restore may reorder
    return out


def top_cumulative(fn: Callable[[], Any], n: int = 8) -> str:
    """The top ``n`` cumulative-time entries of one call of ``fn`` under cProfile."""
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).strip_dirs().sort_stats("cumulative").print_stats(n)
    lines = text.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
    head = next((line.strip() for line in lines if "function calls" in line), "")
    return "\n".join([head, *lines[start:start + n + 1]])


class Bench:
    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, work: Path) -> None:
        self.model, self.opt, self.work = model, opt, work
        self.app = {"model": model, "optimizer": opt}
        self.sources = state_tensors(model, opt)
        self.nbytes = sum(t.numel() * t.element_size() for t in self.sources)
        self.host = [torch.ones_like(t) for t in self.sources]  # preallocated and touched
        self.host_np = [h.numpy() for h in self.host]
        self.times: dict[str, list[float]] = {}
        self.step = 0
        self.sync_ck = Checkpointer(work / "kb-sync", dedup=False)
        self.async_ck = Checkpointer(work / "kb-async", async_save=True, dedup=False)
        self.async_ck.save(self._next_step(), self.app).result()  # allocates the staging buffers
        self.async_ck.manager.delete_all()

    def _next_step(self) -> int:
        self.step += 1
        return self.step

    def record(self, key: str, seconds: float) -> None:
        self.times.setdefault(key, []).append(seconds)

    def median(self, key: str) -> float:
        return statistics.median(self.times[key])

    # -- limits ------------------------------------------------------------------------------
    def memcpy(self) -> None:
        def torch_copy() -> None:
            for d, s in zip(self.host, self.sources):
                d.copy_(s)

        self.sources = state_tensors(self.model, self.opt)  # the live tensors (a restore may have replaced them)
        views = [s.numpy() for s in self.sources]
        self.record("memcpy torch", timed(torch_copy))
        self.record("memcpy numpy", timed(lambda: [np.copyto(d, s) for d, s in zip(self.host_np, views)]))

    def dd(self) -> None:
        self.record("dd", dd_seconds(self.work / "dd.bin", self.nbytes))

    # -- torch.save --------------------------------------------------------------------------
    def torch_save(self) -> None:
        target = self.work / "state.pt"
        self.record("torch.save", timed(lambda: torch.save(
            {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}, target)))
        self.record("torch.load restore", timed(lambda: self._torch_load(target)))
        self._own_optimizer_state()
        drop(target)

    def _own_optimizer_state(self) -> None:
        """Untimed: ``Optimizer.load_state_dict`` kept torch.load's mmapped tensors as the optimizer state; give it
        ordinary memory again, so that whatever is measured next does not pay their page faults."""
        for slots in self.opt.state.values():
            for k, v in slots.items():
                if isinstance(v, torch.Tensor):
                    slots[k] = v.clone()

    def _torch_load(self, target: Path) -> None:
        state = torch.load(target, mmap=True, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])

    def _torch_load_touched(self) -> float:
        target = self.work / "state.pt"
        torch.save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}, target)
        os.sync()
        start = time.perf_counter()
        self._torch_load(target)
        for slots in self.opt.state.values():
            for v in slots.values():
                if isinstance(v, torch.Tensor):
                    v.sum()
        seconds = time.perf_counter() - start
        self._own_optimizer_state()
        drop(target)
        return seconds

    # -- keepbest ----------------------------------------------------------------------------
    def keepbest_sync(self) -> None:
        step = self._next_step()
        self.record("keepbest sync save", timed(lambda: self.sync_ck.save(step, self.app)))
        self.record("keepbest restore", timed(lambda: self.sync_ck.restore(self.app, which=step)))
        self.sync_ck.manager.delete_all()

    def keepbest_async(self) -> None:
        step = self._next_step()
        self.async_ck.wait()  # nothing in flight: the stall is the snapshot, not back-pressure
        start = time.perf_counter()
        handle = self.async_ck.save(step, self.app)
        returned = time.perf_counter()
        handle.result()
        done = time.perf_counter()
        self.record("keepbest async stall", returned - start)
        self.record("keepbest async persist", done - start)
        self.async_ck.manager.delete_all()

    # -- torch DCP ---------------------------------------------------------------------------
    def _dcp_state(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        return {"model": model_sd, "optimizer": optim_sd}

    def dcp_sync(self) -> None:
        target = self.work / "dcp-sync"
        self.record("dcp.save", timed(lambda: dcp.save(self._dcp_state(), checkpoint_id=target)))
        self.record("dcp restore", timed(lambda: self._dcp_load(target)))
        drop(target)

    def _dcp_load(self, target: Path) -> None:
        state = self._dcp_state()
        dcp.load(state, checkpoint_id=target)
        set_state_dict(self.model, self.opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    def dcp_async(self) -> None:
        target = self.work / "dcp-async"
        start = time.perf_counter()
        future = dcp.async_save(self._dcp_state(), checkpoint_id=target)
        returned = time.perf_counter()
        getattr(future, "upload_completion", future).result()
        done = time.perf_counter()
        self.record("dcp.async_save stall", returned - start)
        self.record("dcp.async_save persist", done - start)
        drop(target)

    # -- profiles of missed targets ----------------------------------------------------------
    def profile_restore(self) -> str:
        step = self._next_step()
        self.sync_ck.save(step, self.app)
        ckpt = self.sync_ck.manager.get(step)
        gc.collect()
        os.sync()
        verify = statistics.median(timed(lambda: self.sync_ck.manager.verified([ckpt], wanted=ckpt.location))
                                   for _ in range(3))
        total = statistics.median(timed(lambda: self.sync_ck.restore(self.app, which=step)) for _ in range(3))
        reader = ckpt.reader()
        entries = _state.read_document(reader)
        def load() -> None:  # as restore reads them: the model from the mapped files, the optimizer copied out
            self.model.load_state_dict(_state.entry_state(reader, entries["model"]))
            self.opt.load_state_dict(_state.owned_copy(_state.entry_state(reader, entries["optimizer"])))

        copy = statistics.median(timed(load) for _ in range(3))
        gc.collect()
        resident = statistics.median(self._torch_load_touched() for _ in range(3))
        prof = top_cumulative(lambda: self.sync_ck.restore(self.app, which=step))
        self.sync_ck.manager.delete_all()
        return "\n".join([
            f"- whole `Checkpointer.restore`: {total * MS:.1f} ms (median of 3)",
            f"- of which digest verification (`manager.verified`, BLAKE3 of every file): {verify * MS:.1f} ms",
            f"- `load_state_dict` of model + optimizer from the checkpoint's mmapped tensors "
            f"(the optimizer state copied into memory first, as restore does): {copy * MS:.1f} ms",
            f"- torch.load(mmap=True) + load_state_dict, same round medians: "
            f"{self.median('torch.load restore') * MS:.1f} ms. `Optimizer.load_state_dict` keeps the loaded "
            "tensors as they are (same dtype and device), so the optimizer state is left on the file's "
            "copy-on-write mmap and only read on first use; the same restore followed by one read pass over the "
            f"optimizer state (`sum()` of every slot): {resident * MS:.1f} ms (median of 3, for context; the "
            "target compares with the figure in the table)",
            "",
            "cProfile of one `Checkpointer.restore` (top 8, cumulative):",
            "",
            "```",
            prof,
            "```",
        ])

    def profile_async_stall(self) -> str:
        self.async_ck.wait()
        step = self._next_step()
        handle: list[Any] = []
        prof = top_cumulative(lambda: handle.append(self.async_ck.save(step, self.app)))
        handle[0].result()
        self.async_ck.manager.delete_all()
        return "\n".join([
            "cProfile of one steady-state `Checkpointer(async_save=True).save` call (top 8, cumulative):",
            "",
            "```",
            prof,
            "```",
        ])

    def close(self) -> None:
        self.sync_ck.close()
        self.async_ck.close()


def run_size(weight_bytes: int, rounds: int, work_root: Path) -> tuple[dict[str, float], dict[str, str]]:
    torch.manual_seed(0)
    model, opt = build(weight_bytes)
    work = Path(tempfile.mkdtemp(prefix="keepbest-torch-bench-", dir=work_root))
    try:
        bench = Bench(model, opt, work)
        for _ in range(rounds):  # interleaved, so a slow moment of the disk hits every method alike
            # memcpy right before the async save: memory bandwidth on a shared VM drifts by several times over
            # seconds, so the stall target is also given as a ratio within each round.
            for step in (bench.dd, bench.memcpy, bench.keepbest_async, bench.keepbest_sync,
                         bench.dcp_async, bench.dcp_sync, bench.torch_save):
                # Untimed: torch.save does not fsync, and its dirty pages would otherwise be written back
                # (taking CPU and memory bandwidth) during whatever is measured next.
                gc.collect()
                os.sync()
                step()
        out = {key: bench.median(key) for key in bench.times}
        out["memcpy"] = min(out["memcpy torch"], out["memcpy numpy"])
        fastest = [min(a, b) for a, b in zip(bench.times["memcpy torch"], bench.times["memcpy numpy"])]
        out["paired stall ratio"] = statistics.median(
            stall / copy for stall, copy in zip(bench.times["keepbest async stall"], fastest))
        out["memcpy torch min"] = min(bench.times["memcpy torch"])
        out["memcpy torch max"] = max(bench.times["memcpy torch"])
        out["state_bytes"] = bench.nbytes
        out["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        profiles = {}
        if out["keepbest async stall"] > out["memcpy"]:
            gc.collect()
            os.sync()
            profiles["async stall"] = bench.profile_async_stall()
        if out["keepbest restore"] > out["torch.load restore"]:
            gc.collect()
            os.sync()
            profiles["restore"] = bench.profile_restore()
        bench.close()
        return out, profiles
    finally:
        shutil.rmtree(work, ignore_errors=True)


ROWS = [
    # label, stall key, persist key, restore key
    ("`torch.save` (no fsync)", "torch.save", "torch.save", "torch.load restore"),
    ("keepbest sync", "keepbest sync save", "keepbest sync save", "keepbest restore"),
    ("keepbest async", "keepbest async stall", "keepbest async persist", "keepbest restore"),
    ("torch DCP `dcp.save`", "dcp.save", "dcp.save", "dcp restore"),
    ("torch DCP `dcp.async_save`", "dcp.async_save stall", "dcp.async_save persist", "dcp restore"),
    ("limit: memcpy, torch `copy_`", "memcpy torch", None, None),
    ("limit: memcpy, numpy `copyto`", "memcpy numpy", None, None),
    ("limit: dd bs=64M conv=fsync", None, "dd", None),
]


def table(label: str, r: dict[str, float]) -> str:
    lines = [f"### {label} of weights ({r['weight_bytes'] / GB:.3f} GB of weights, "
             f"{r['state_bytes'] / GB:.3f} GB of state with AdamW)", "",
             "| method | training stall (ms) | persist (GB/s) | restore (ms) |",
             "|---|---:|---:|---:|"]
    for name, stall, persist, restore in ROWS:
        cells = [f"{r[stall] * MS:.1f}" if stall else "",
                 f"{r['state_bytes'] / r[persist] / GB:.2f}" if persist else "",
                 f"{r[restore] * MS:.1f}" if restore else ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(r: dict[str, float]) -> str:
    def verdict(ratio: float) -> str:
        return "met" if ratio <= 1.0 else f"missed ({ratio:.2f}×)"

    stall = r["keepbest async stall"] / r["memcpy"]
    restore = r["keepbest restore"] / r["torch.load restore"]
    faster = "torch copy_" if r["memcpy torch"] <= r["memcpy numpy"] else "numpy copyto"
    return (f"Targets: keepbest async stall ≤ 1.0× memcpy of the state ({faster}, the faster): "
            f"{stall:.2f}× → {verdict(stall)}; keepbest restore ≤ torch.load(mmap=True)+load_state_dict: "
            f"{restore:.2f}× → {verdict(restore)}\n\n"
            f"For reading the stall: within each round the async save ran right after the memcpy; the median "
            f"of those per-round ratios is {r['paired stall ratio']:.2f}×. The torch `copy_` memcpy of the same "
            f"bytes ranged {r['memcpy torch min'] * MS:.1f}–{r['memcpy torch max'] * MS:.1f} ms over the rounds.")


def machine() -> str:
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return f"{platform.platform()}, {os.cpu_count()} cores ({cpu})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10MB,100MB,1GB", help="weight sizes, comma separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: the system temp folder)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("TORCH_RESULTS.md")))
    args = parser.parse_args(argv)
    work_root = Path(args.dir or tempfile.gettempdir())
    torch.set_num_threads(os.cpu_count() or 1)
    sections = []
    for text in args.sizes.split(","):
        print(f"measuring {text} ...", flush=True)
        started = time.perf_counter()
        r, profiles = run_size(parse_size(text), args.rounds, work_root)
        print(f"  {text} took {time.perf_counter() - started:.0f} s", flush=True)
        section = [table(text, r), "", targets(r)]
        for what, body in profiles.items():
            section += ["", f"Profile of the missed {what} target ({text}):", "", body]
        sections.append("\n".join(section))
    report = "\n".join([
        "# Checkpoint speed: torch.save, torch DCP and keepbest on a PyTorch training state",
        "",
        f"Generated by `benchmarks/torch_speed.py --sizes {args.sizes} --rounds {args.rounds}`: "
        f"torch {torch.__version__}, NumPy {np.__version__}, keepbest {keepbest.__version__}, "
        f"Python {platform.python_version()}, {machine()}, writing to {work_root}. "
        f"Medians of {args.rounds} interleaved rounds.",
        "",
        "The figures come from a shared 2-core machine on which other people may have been running tests at the "
        "same time: read them as rough, and compare rows of one table (measured in the same rounds) rather than "
        "runs.",
        "",
        "Stall: the training thread blocked per save. Persist: state bytes / time until durable (`torch.save` "
        "does not fsync, so its figure stops at the page cache). Restore: into the already built model and "
        "optimizer; the async rows write the same files as the sync ones and share their restore.",
        "",
        "\n\n".join(sections),
        "",
    ])
    print(report)
    Path(args.out).write_text(report)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
