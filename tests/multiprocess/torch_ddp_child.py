"""One process of a 2-process DDP job (gloo on 127.0.0.1) that saves with keepbest.torch.Checkpointer.

Each process trains the DDP-wrapped model on its own batches (seeded by rank) for 6 steps, saving every 2
steps (``--async`` in the background). Then it restores the latest checkpoint into a fresh model and
optimizer and writes, to ``<out>-<rank>.json``: the SHA-256 of its trained and of its restored state, and
the torch random number it draws after the restore and after the save (they must agree per process).
"""

from __future__ import annotations

import argparse
import hashlib
import json

import torch
import torch.distributed as dist

from tests.multiprocess.procs import child_main


def digest(module: torch.nn.Module, opt: torch.optim.Optimizer) -> str:
    h = hashlib.sha256()
    for t in module.state_dict().values():
        h.update(t.numpy().tobytes())
    for st in opt.state_dict()["state"].values():
        for v in st.values():
            h.update(v.numpy().tobytes())
    return h.hexdigest()


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int)
    p.add_argument("--world", type=int)
    p.add_argument("--port", type=int)
    p.add_argument("--dir")
    p.add_argument("--out")
    p.add_argument("--async", dest="async_save", action="store_true")
    p.add_argument("--early", action="store_true",
                   help="create the Checkpointer before init_process_group; write the error its save raises")
    args = p.parse_args()
    from keepbest.torch import Checkpointer

    early = Checkpointer(args.dir) if args.early else None
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                            world_size=args.world)
    if early is not None:
        try:
            early.save(1, {"model": build()[0]})
        except RuntimeError as e:
            with open(f"{args.out}-{args.rank}.json", "w") as f:
                json.dump({"error": str(e)}, f)
        dist.destroy_process_group()
        return

    model, opt = build()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ckpt = Checkpointer(args.dir, monitor="loss", keep_last=2, async_save=args.async_save)
    data = torch.Generator().manual_seed(100 + args.rank)
    for step in range(1, 7):
        x, y = torch.randn(8, 16, generator=data), torch.randint(0, 4, (8,), generator=data)
        loss = torch.nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 2 == 0:
            ckpt.save(step, {"model": model, "optimizer": opt}, metrics={"loss": loss.item()})
    ckpt.wait()
    torch.manual_seed(1000 + args.rank)
    ckpt.save(6, {"model": model, "optimizer": opt}, metrics={"loss": 0.0})  # again: the RNG state of this moment
    ckpt.wait()
    after_save = torch.rand(1).item()
    trained = digest(model, opt)
    fresh, fresh_opt = build()
    restored = ckpt.restore({"model": fresh, "optimizer": fresh_opt})
    after_restore = torch.rand(1).item()
    ckpt.close()
    with open(f"{args.out}-{args.rank}.json", "w") as f:
        json.dump({"trained": trained, "restored": digest(fresh, fresh_opt), "step": restored.step,
                   "after_save": after_save, "after_restore": after_restore}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    child_main(main)
