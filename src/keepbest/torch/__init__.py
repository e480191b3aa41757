"""keepbest for PyTorch: crash-safe checkpoints of a training loop in safetensors and JSON, never pickle.

Only this package (and :mod:`keepbest.lightning`) imports torch::

    from keepbest.torch import Checkpointer

    ckpt = Checkpointer("runs/a", monitor="val_loss", keep_last=3)
    start = ckpt.restore(app_state)            # None on the first run
    ...
    ckpt.save(step, app_state, metrics={"val_loss": v}, epoch=epoch)
"""

from keepbest.torch._checkpointer import Checkpointer
from keepbest.torch._sidecar import SidecarEvaluator, accuracy

__all__ = ["Checkpointer", "SidecarEvaluator", "accuracy"]
