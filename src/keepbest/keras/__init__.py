"""keepbest for Keras 3, on any backend (JAX, torch, TensorFlow).

Change one import to adopt it::

    from keepbest.keras import ModelCheckpoint   # was: from keras.callbacks import ModelCheckpoint

``keepbest.keras.utils.SidecarEvaluator`` and
``keepbest.keras.callbacks.SidecarEvaluatorModelExport`` bring back Keras 2.15's
sidecar evaluator at the paths Keras 2 had them.
"""

from keepbest.keras._backup import BackupAndRestore
from keepbest.keras._callback import ModelCheckpoint
from keepbest.keras._loading import load_model, load_weights
from keepbest.keras._sidecar import SidecarEvaluator, SidecarEvaluatorModelExport
from keepbest.keras._wandb import WandbModelCheckpoint
from keepbest.keras import callbacks, utils

__all__ = ["BackupAndRestore", "ModelCheckpoint", "SidecarEvaluator", "SidecarEvaluatorModelExport",
           "WandbModelCheckpoint", "callbacks", "load_model", "load_weights", "utils"]
