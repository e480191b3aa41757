"""Test-wide settings: Keras must not follow the machine's keras.json (it may name TensorFlow)."""

import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("KERAS_HOME", str(Path(__file__).resolve().parent.parent / ".keras_home"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Hypothesis keeps its example database out of the working tree.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(__import__("tempfile").gettempdir(), "keepbest-hypothesis"))
