"""One process of a Keras 3 job on JAX (CPU, gloo collectives) under ``keras.distribution``.

Modes:
- ``fit``: trains under DataParallel (each process feeds its own half of the data) or ModelParallel (the
  hidden layer's kernel sharded across the processes) with keepbest's ModelCheckpoint, then dumps its final
  weights (the whole of each variable: gathered from the pieces where it is sharded);
- ``restore``: builds the same model under the same distribution, loads a checkpoint into it with
  ``keepbest.keras.load_weights``, and dumps the weights;
- ``preempt``: only builds ``BackupAndRestore(save_before_preemption=True)``;
- ``backup``: trains with BackupAndRestore (a backup every few batches) and logs each batch's loss; with
  ``--die-at`` process 1 kills itself (SIGKILL) at that batch of the first run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal

import numpy as np

SCORES = [3.0, 2.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.5, 6.0, 7.0]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int)
    p.add_argument("--world", type=int)
    p.add_argument("--port", type=int)
    p.add_argument("--mode", choices=("fit", "restore", "backup", "preempt"))
    p.add_argument("--parallel", choices=("data", "model"), default="data")
    p.add_argument("--url")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--out")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--die-at", type=int, default=0)
    args = p.parse_args()

    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import keras

    if args.world > 1:
        keras.distribution.initialize(job_addresses=f"127.0.0.1:{args.port}", num_processes=args.world,
                                      process_id=args.rank)
    devices = jax.devices()
    if args.parallel == "model":
        mesh = keras.distribution.DeviceMesh((1, len(devices)), ["batch", "model"], devices)
        layout = keras.distribution.LayoutMap(mesh)
        layout[".*hidden/kernel"] = (None, "model")  # (keys are matched in full, as regular expressions)
        distribution = keras.distribution.ModelParallel(layout_map=layout, batch_dim_name="batch",
                                                        auto_shard_dataset=False)
    else:
        mesh = keras.distribution.DeviceMesh((len(devices),), ["batch"], devices)
        distribution = keras.distribution.DataParallel(device_mesh=mesh, auto_shard_dataset=False)
    keras.distribution.set_distribution(distribution)

    from keepbest.distributed import JaxCoordinator
    from keepbest.keras import BackupAndRestore, ModelCheckpoint, load_weights

    coordinator = JaxCoordinator(timeout=args.timeout) if args.world > 1 else None
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu", name="hidden"),
                              keras.layers.Dense(4, name="out")])
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 16)).astype("float32")
    y = (x[:, :4].argmax(axis=1)).astype("int32")
    batch = 32
    if args.parallel == "data":  # each process feeds its own part (ModelParallel here has no batch axis to split)
        x, y = x[args.rank::args.world], y[args.rank::args.world]
        batch = 32 // args.world  # 1 process feeds all of it, in batches as large as all parts together

    if args.mode == "fit":
        scores = [s + (10.0 if args.rank else 0.0) * (i % 2) for i, s in enumerate(SCORES)]  # process 1 disagrees
        score = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: logs.update(score=scores[e]))
        checkpoint = ModelCheckpoint(os.path.join(args.url, "ckpt-{epoch:02d}"), monitor="score", mode="min",
                                     keep_last=2, keep_best=1, async_save=args.async_save, coordinator=coordinator)
        staged: list[int] = []  # bytes of this process's snapshot after each save (async_save)
        record = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda e, logs: staged.append(checkpoint._writer.staging.nbytes))
        model.fit(x, y, batch_size=batch, epochs=args.epochs, shuffle=False, verbose=0,
                  callbacks=[score, checkpoint, record])
    elif args.mode == "preempt":
        BackupAndRestore(args.url, save_before_preemption=True)  # refused with several processes
    elif args.mode == "restore":
        model.build((None, 16))
        load_weights(model, args.url)
    else:
        losses: list[float] = []

        class Record(keras.callbacks.Callback):
            def on_train_batch_end(self, b, logs=None):  # type: ignore[no-untyped-def]
                losses.append(float(logs["loss"]))
                step = int(np.asarray(model.optimizer.iterations.value.addressable_shards[0].data))
                with open(f"{args.out}-{args.rank}.losses", "a") as f:
                    f.write(f"{step} {float(logs['loss'])!r}\n")
                if args.die_at and args.rank == 1 and len(losses) == args.die_at:
                    os.kill(os.getpid(), signal.SIGKILL)

        backup = BackupAndRestore(args.url, save_freq=3, delete_checkpoint=False, coordinator=coordinator)
        model.fit(x, y, batch_size=batch, epochs=args.epochs, shuffle=False, verbose=0, callbacks=[backup, Record()])

    if args.out:
        weights = {f"{i}": gathered(v) for i, v in enumerate(model.weights)}
        np.savez(f"{args.out}-{args.rank}.npz", **weights)
        with open(f"{args.out}-{args.rank}.json", "w") as f:
            json.dump({"paths": [v.path for v in model.weights], "staged": staged if args.mode == "fit" else [],
                       "sharded": [not v.value.is_fully_replicated for v in model.weights]}, f)
    print("done", flush=True)


def gathered(variable) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The whole value of a variable, put together from this process's pieces and the other's."""
    from jax.experimental import multihost_utils

    value = variable.value
    if value.is_fully_addressable:
        return np.asarray(value)
    return np.asarray(multihost_utils.process_allgather(value, tiled=True))


if __name__ == "__main__":
    from tests.multiprocess.procs import child_main

    child_main(main)
