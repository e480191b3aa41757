"""keepbest for Keras 3, on any backend (JAX, torch, TensorFlow).

Change one import to adopt it::

    from keepbest.keras import ModelCheckpoint   # was: from keras.callbacks import ModelCheckpoint
"""

from keepbest.keras._callback import ModelCheckpoint
from keepbest.keras._loading import load_model, load_weights

__all__ = ["ModelCheckpoint", "load_model", "load_weights"]
