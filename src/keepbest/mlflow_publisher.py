"""Mirrors a series of checkpoints into an MLflow run, with the best in the model registry.

Each commit is logged as artifacts of the run under ``checkpoints/v<N>/<name>``
(a fixed filepath replaced by a better model gets a new folder, so a
version's files never change remotely), and its metrics at the
checkpoint's optimizer step. The version that holds the ``best`` alias
(and each one a user alias such as ``production`` points at) is
registered as a model version of ``registered_model_name``, with the same
alias on it; the alias moves when keepbest's does. A version that keepbest
deletes locally is deleted from the run's artifacts, and its model
version (if any) from the registry.

Works against any tracking URI MLflow supports: the default local store,
or an ``mlflow server`` (artifacts served by the server).

Example:
    >>> import mlflow  # doctest: +SKIP
    >>> with mlflow.start_run():  # doctest: +SKIP
    ...     model.fit(x, y, callbacks=[ModelCheckpoint("ckpt/e{epoch}", keep_last=2,
    ...                                                publishers=[MlflowPublisher()])])
"""

from __future__ import annotations

from typing import Any, Mapping

from keepbest.series import is_automatic
from keepbest.publishing import Publisher, Version



def import_mlflow() -> Any:
    try:
        import mlflow
    except ImportError:
        raise ImportError("Publishing to MLflow needs mlflow: pip install 'keepbest[mlflow]'") from None
    return mlflow


class MlflowPublisher(Publisher):
    """Logs each committed checkpoint to an MLflow run; registers the best.

    Args:
        run_id: the run to log to; by default the active run (``mlflow.start_run()``).
        tracking_uri: by default MLflow's current one.
        artifact_path: folder of the run's artifacts that holds the checkpoints.
        registered_model_name: the registry name for the best version;
            defaults to ``run_<run id>_model``. ``None`` with ``register=False``
            registers nothing.
        register: register ``best`` and user-aliased versions.
        log_metrics: log each checkpoint's metrics at its step (turn off when
            the metrics are logged already, e.g. by ``mlflow.keras.autolog``).
    """

    def __init__(self, run_id: str | None = None, *, tracking_uri: str | None = None,
                 artifact_path: str = "checkpoints", registered_model_name: str | None = None,
                 register: bool = True, log_metrics: bool = True) -> None:
        mlflow = import_mlflow()
        from mlflow.tracking import MlflowClient

        if run_id is None:
            active = mlflow.active_run()
            if active is None:
                raise RuntimeError("MlflowPublisher needs an MLflow run to log to: call mlflow.start_run() first, "
                                   "or pass run_id=. Received: no active run, run_id=None")
            run_id = active.info.run_id
        self.client = MlflowClient(tracking_uri or mlflow.get_tracking_uri())
        self.run_id = run_id
        self.artifact_uri = self.client.get_run(run_id).info.artifact_uri
        self.artifact_path = artifact_path.strip("/")
        self.model_name = (registered_model_name or f"run_{run_id}_model") if register else None
        self.log_metrics = log_metrics
        self.logged: dict[int, str] = {}  # keepbest version -> artifact path of its checkpoint
        self.registered: dict[int, str] = {}  # keepbest version -> model version
        self._aliases: dict[str, str] = {}  # registry alias -> model version, as set

    def committed(self, version: Version) -> None:
        m = version.manifest
        folder = f"{self.artifact_path}/v{version.number}"
        if m.layout == "dir":
            self.client.log_artifacts(self.run_id, str(version.path), artifact_path=f"{folder}/{m.name}")
        else:
            self.client.log_artifact(self.run_id, str(version.path), artifact_path=folder)
        self.logged[version.number] = f"{folder}/{m.name}"
        if self.log_metrics and m.metrics:
            from mlflow.entities import Metric

            step = m.step if m.step is not None else (m.epoch or 0)
            stamp = int(m.created * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), stamp, step)
                                                        for k, v in sorted(m.metrics.items())])

    def aliases_moved(self, series: str, aliases: Mapping[str, int]) -> None:
        if self.model_name is None:
            return
        wanted = {a: n for a, n in aliases.items() if a == "best" or not is_automatic(a)}
        for alias, number in sorted(wanted.items()):
            if number not in self.logged:
                continue  # its upload failed: nothing to register
            model_version = self._register(number)
            if self._aliases.get(alias) != model_version:
                self.client.set_registered_model_alias(self.model_name, alias, model_version)
                self._aliases[alias] = model_version
        for alias in [a for a in self._aliases if a not in wanted]:  # a user alias was removed
            self.client.delete_registered_model_alias(self.model_name, alias)
            del self._aliases[alias]

    def _register(self, number: int) -> str:
        if number not in self.registered:
            assert self.model_name is not None
            if not self.registered:
                self._ensure_registered_model(self.model_name)
            mv = self.client.create_model_version(self.model_name, source=f"runs:/{self.run_id}/{self.logged[number]}",
                                                  run_id=self.run_id, tags={"keepbest.version": str(number)})
            self.registered[number] = str(mv.version)
        return self.registered[number]

    def _ensure_registered_model(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException as e:
            if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise
            self.client.create_registered_model(name)

    def deleted(self, series: str, number: int, name: str) -> None:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        path = self.logged.pop(number, None)
        if path is None:
            return  # never uploaded (its upload failed, or it predates this publisher)
        get_artifact_repository(self.artifact_uri).delete_artifacts(path.rsplit("/", 1)[0])
        model_version = self.registered.pop(number, None)
        if model_version is not None and self.model_name is not None:
            self.client.delete_model_version(self.model_name, model_version)
            self._aliases = {a: v for a, v in self._aliases.items() if v != model_version}
