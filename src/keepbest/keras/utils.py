"""Keras 2's ``keras.utils`` path for the sidecar evaluator.

``from keepbest import keras`` lets code written for Keras 2.15 call
``keras.utils.SidecarEvaluator(...)`` unchanged.
"""

from keepbest.keras._sidecar import SidecarEvaluator

__all__ = ["SidecarEvaluator"]
