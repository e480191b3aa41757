"""The same training script on 1 process or N: Keras on JAX with keras.distribution, saved by keepbest.

    python examples/multiprocess.py --dir runs/mp                  # 1 process
    python examples/multiprocess.py --dir runs/mp --processes 2    # 2 local processes (this script starts them)
    # N hosts: run on each, with its own --process-id and the address of process 0
    python examples/multiprocess.py --dir s3://bucket/mp --coordinator 10.0.0.1:1234 --num-processes 4 --process-id 0

Each process feeds its own part of the data (``DataParallel``); keepbest's
``ModelCheckpoint`` and ``BackupAndRestore`` need no change: with JAX's
distributed runtime initialized, every process writes the variables it owns
and process 0 decides and commits. ``--dir`` must be the same folder for all
(a shared filesystem) or a bucket URL.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", required=True, help="a folder all processes see, or an s3:// URL")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--processes", type=int, default=1, help="start this many local processes")
    p.add_argument("--coordinator", help="host:port of process 0 (several hosts)")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    args = p.parse_args()
    if args.processes > 1:  # a local launcher: the same script, once per process
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            address = f"127.0.0.1:{s.getsockname()[1]}"
        children = [subprocess.Popen([sys.executable, __file__, "--dir", args.dir, "--epochs", str(args.epochs),
                                      "--coordinator", address, "--num-processes", str(args.processes),
                                      "--process-id", str(i)]) for i in range(args.processes)]
        return max(c.wait() for c in children)

    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this example trains on the CPU
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import keras
    from sklearn.datasets import load_digits

    from keepbest.keras import BackupAndRestore, ModelCheckpoint

    if args.num_processes > 1:
        keras.distribution.initialize(job_addresses=args.coordinator, num_processes=args.num_processes,
                                      process_id=args.process_id)
    devices = jax.devices()
    keras.distribution.set_distribution(keras.distribution.DataParallel(
        device_mesh=keras.distribution.DeviceMesh((len(devices),), ["batch"], devices), auto_shard_dataset=False))

    digits = load_digits()
    x, y = (digits.data / 16.0).astype("float32"), digits.target
    rank, n = args.process_id, args.num_processes
    x, y = x[rank::n][: len(x) // n], y[rank::n][: len(y) // n]  # this process's part, the same size on each
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)])
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callbacks = [
        BackupAndRestore(os.path.join(args.dir, "backup")),
        ModelCheckpoint(os.path.join(args.dir, "epoch{epoch:02d}"), monitor="loss", keep_last=2, keep_best=1),
    ]
    model.fit(x, y, batch_size=64 // n, epochs=args.epochs, verbose=0, callbacks=callbacks)
    print(f"process {rank} of {n}: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
