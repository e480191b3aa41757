"""``keepbest.keras.WandbModelCheckpoint``: W&B's Keras callback on keepbest, without TensorFlow."""

from __future__ import annotations

import os
from typing import Any

from keepbest.keras._callback import ModelCheckpoint
from keepbest.wandb_publisher import WandbPublisher, active_run


class WandbModelCheckpoint(ModelCheckpoint):
    """``wandb.integration.keras.WandbModelCheckpoint`` with the same signature, on any backend.

    Each saved checkpoint becomes a version of the run's ``run_<id>_model``
    artifact, uploaded in the background, with the aliases ``latest``,
    ``best`` (by ``monitor``) and ``epoch_N`` (1-based, as in the file
    names) and its epoch, step, metrics, monitor and mode as metadata.
    Unlike W&B's callback it imports no TensorFlow, does not crash when
    ``save_best_only`` skips an epoch of an ``{epoch}`` template, never
    re-logs a stale best, and with ``keep_last``/``keep_best`` deletes the
    versions it prunes locally on W&B too (online; see ``WandbPublisher``).
    Any keyword of :class:`keepbest.keras.ModelCheckpoint` is accepted.

    Example:
        >>> run = wandb.init(project="digits")  # doctest: +SKIP
        >>> model.fit(x, y, validation_split=0.2, epochs=5,  # doctest: +SKIP
        ...           callbacks=[WandbModelCheckpoint("models/e{epoch:02d}.keras", save_best_only=True)])
    """

    def __init__(self, filepath: str | os.PathLike[str], monitor: str = "val_loss", verbose: int = 0,
                 save_best_only: bool = False, save_weights_only: bool = False, mode: str = "auto",
                 save_freq: str | int = "epoch", initial_value_threshold: float | None = None,
                 **kwargs: Any) -> None:
        run = active_run("WandbModelCheckpoint")  # W&B's callback refuses to exist without a run, too
        publishers = [*kwargs.pop("publishers", ()), WandbPublisher(run)]
        super().__init__(filepath, monitor, verbose, save_best_only, save_weights_only, mode, save_freq,
                         initial_value_threshold, publishers=publishers, **kwargs)
