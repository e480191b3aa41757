"""Mirrors a series of checkpoints as versions of one W&B ``model`` artifact.

Each commit is logged as a new version with its aliases (``latest``,
``best``, ``epoch_N`` 1-based, user aliases) and metadata (epoch, batch,
step, metrics, monitor, mode, keepbest's version number). Only the ``wandb``
SDK is imported, never TensorFlow. Works offline (``WANDB_MODE=offline``):
the versions are recorded in the run's directory and uploaded by
``wandb sync``.

Online, a version that keepbest deletes locally (retention, or a fixed
filepath replaced by a better model) is deleted on W&B with its aliases,
after the new version's upload committed; an alias moved by
``keepbest promote`` is moved there too. W&B has no offline record for
either: offline, they are logged as not done (once) and left for the
server-side retention of the project.

Example:
    >>> import wandb  # doctest: +SKIP
    >>> run = wandb.init(project="digits")  # doctest: +SKIP
    >>> mgr = CheckpointManager("ckpts", publishers=[WandbPublisher()])  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from keepbest.series import is_automatic
from keepbest.publishing import Publisher, Version

log = logging.getLogger("keepbest")


def import_wandb() -> Any:
    try:
        import wandb
    except ImportError:
        raise ImportError("Publishing to W&B needs the wandb SDK: pip install 'keepbest[wandb]'") from None
    return wandb


def active_run(owner: str) -> Any:
    """``wandb.run``, or W&B's own error when no run is active (as the original callback raises it)."""
    wandb = import_wandb()
    if wandb.run is None:
        raise wandb.Error(f"You must call `wandb.init()` before `{owner}()`")
    return wandb.run


class WandbPublisher(Publisher):
    """Logs each committed checkpoint as a version of a W&B artifact.

    Args:
        run: the W&B run to log to; by default the active ``wandb.run``.
        artifact_name: defaults to ``run_<run id>_model``, the name W&B's
            Keras callback uses.
        artifact_type: W&B artifact type.
    """

    def __init__(self, run: Any = None, *, artifact_name: str | None = None, artifact_type: str = "model") -> None:
        self.wandb = import_wandb()
        self.run = run if run is not None else active_run("WandbPublisher")
        self.artifact_name = artifact_name or f"run_{self.run.id}_model"
        self.artifact_type = artifact_type
        self.offline = bool(self.run.offline)
        self.remote: dict[int, str] = {}  # keepbest version -> W&B version ("v3"), known online only
        self._said_offline = self._said_aliases = False

    def committed(self, version: Version) -> None:
        m = version.manifest
        artifact = self.wandb.Artifact(self.artifact_name, type=self.artifact_type, metadata={
            "epoch": m.epoch, "batch": m.batch, "step": m.step, "metrics": dict(m.metrics),
            "monitor": m.monitor.name if m.monitor else None, "mode": m.monitor.mode if m.monitor else None,
            "keepbest_version": version.number, "checkpoint": m.name, "series": version.series,
        })
        if m.layout == "dir":
            artifact.add_dir(str(version.path), name=m.name)
        else:
            artifact.add_file(str(version.path), name=m.name)
        self.run.log_artifact(artifact, aliases=list(version.aliases))
        if not self.offline:
            artifact.wait()  # committed on W&B: only now may older versions be deleted there
            self.remote[version.number] = artifact.version

    def aliases_moved(self, series: str, aliases: Mapping[str, int]) -> None:
        # Automatic aliases travel with each logged version; only user aliases can move elsewhere.
        if self.offline:
            user = sorted(a for a in aliases if not is_automatic(a))
            if user and not self._said_aliases:
                self._said_aliases = True
                log.warning("keepbest: W&B is offline, so the user aliases %s are not set on W&B (W&B records "
                            "no alias moves offline); set them there after `wandb sync`.", ", ".join(user))
            return
        for alias, number in aliases.items():
            if number in self.remote:
                remote = self._api_artifact(self.remote[number])
                if alias not in remote.aliases:
                    remote.aliases.append(alias)
                    remote.save()

    def deleted(self, series: str, number: int, name: str) -> None:
        if self.offline:
            if not self._said_offline:
                self._said_offline = True
                log.warning("keepbest: W&B is offline, so versions of %s that keepbest deletes locally (v%d, "
                            "%s, ...) are not deleted on W&B (W&B records no deletions offline); delete them "
                            "there after `wandb sync`, or publish online.", self.artifact_name, number, name)
            return
        if number in self.remote:
            self._api_artifact(self.remote.pop(number)).delete(delete_aliases=True)

    def _api_artifact(self, remote_version: str) -> Any:
        path = f"{self.run.entity}/{self.run.project}/{self.artifact_name}:{remote_version}"
        return self.wandb.Api().artifact(path, type=self.artifact_type)
