"""Keras's ``keras.callbacks`` path for keepbest's callbacks.

``from keepbest.keras.callbacks import ModelCheckpoint, SidecarEvaluatorModelExport``
mirrors ``from keras.callbacks import ...``.
"""

from keepbest.keras._callback import ModelCheckpoint
from keepbest.keras._sidecar import SidecarEvaluatorModelExport

__all__ = ["ModelCheckpoint", "SidecarEvaluatorModelExport"]
