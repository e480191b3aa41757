"""One process of a torch.distributed job (gloo on 127.0.0.1) or of a JAX job (its distributed client, CPU)
that saves through CheckpointManager.

Each epoch changes a replicated state (the same on every process, as DDP keeps it) and a per-process shard,
saves with keep_last=2, keep_best=1, and logs what it committed. The bytes of tensor data this process writes
are counted at the store (the writes of shard files). ``--forever`` saves back to back until killed.
"""

from __future__ import annotations

import argparse
import json
import re

import numpy as np

LOSSES = [3.0, 2.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.5, 6.0, 7.0]


def count_part_bytes(written: list[int]) -> None:
    """Counts the bytes of the shard files this process writes (its tensors), whatever the store."""
    from keepbest.store import _local_files, _object_files

    for cls in (_local_files.LocalStaged, _object_files.ObjectStaged):
        original = cls.write

        def write(self, rel, data, digest=None, _original=original):  # type: ignore[no-untyped-def]
            entry = _original(self, rel, data, digest)
            if re.search(r"-p\d{5}-\d{5}\.safetensors$", rel) or rel.startswith("state-"):
                written.append(entry.size)
            return entry

        cls.write = write  # type: ignore[method-assign]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int)
    p.add_argument("--world", type=int)
    p.add_argument("--port", type=int)
    p.add_argument("--url", help="where to save; {rank} is this process's index")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--out")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--forever", action="store_true")
    p.add_argument("--size", type=int, default=1 << 20, help="floats in the replicated tensor")
    p.add_argument("--engine", choices=("torch", "jax"), default="torch")
    p.add_argument("--fail-at", type=int, default=0,
                   help="at this epoch process 1 saves a tensor safetensors cannot store: the save fails everywhere")
    args = p.parse_args()

    coordinator = None
    if args.world > 1 and args.engine == "jax":
        import jax

        jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.world, process_id=args.rank,
                                   shutdown_timeout_seconds=int(args.timeout))  # a lost peer: exit soon
        from keepbest.distributed import JaxCoordinator

        coordinator = JaxCoordinator(timeout=args.timeout)
    elif args.world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                                world_size=args.world)
        from keepbest.distributed import TorchCoordinator

        coordinator = TorchCoordinator(timeout=args.timeout)
    from keepbest import CheckpointManager, KeepBest, KeepLast, Monitor

    written: list[int] = []
    count_part_bytes(written)
    mgr = CheckpointManager(args.url.format(rank=args.rank), monitor=Monitor("loss", "min"), keep=[KeepLast(2), KeepBest(1)],
                            coordinator=coordinator)
    w = np.linspace(0, 1, args.size, dtype=np.float32)
    shard = np.full(1000, args.rank, np.float64)
    epoch = 0
    while args.forever or epoch < args.epochs:
        epoch += 1
        w = w * np.float32(0.5) + np.float32(epoch)
        shard = shard + 1
        half = len(w) // 2
        state = {"model/w1": w[:half], "model/w2": w[half:], "model/b": np.arange(7, dtype=np.int64) * epoch,
                 f"optimizer/process{args.rank}": shard}
        if epoch == args.fail_at and args.rank == 1:
            state["optimizer/complex"] = np.zeros(2, np.complex64)
        print(f"saving {epoch}", flush=True)
        try:
            ckpt = mgr.save_async(epoch * 10, state, metrics={"loss": LOSSES[(epoch - 1) % len(LOSSES)]},
                                  epoch=epoch).result()
        except Exception as e:
            if epoch != args.fail_at:
                raise
            print(f"failed {epoch}: {type(e).__name__}: {e}", flush=True)
            continue
        print(f"committed {ckpt.name} v{ckpt.manifest.version}", flush=True)
    mgr.close()
    if args.world > 1 and args.engine == "torch":
        import torch.distributed as dist

        dist.barrier()  # (a process that leaves while another still talks to it aborts in gloo's teardown)
        dist.destroy_process_group()
    if args.out:
        np.savez(f"{args.out}-{args.rank}.npz", **state)
        with open(f"{args.out}-{args.rank}.json", "w") as f:
            json.dump({"written": sum(written), "saves": epoch}, f)
    print("done", flush=True)


if __name__ == "__main__":
    from tests.multiprocess.procs import child_main

    child_main(main)
