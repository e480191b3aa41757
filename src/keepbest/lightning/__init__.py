"""keepbest for Lightning 2.6: ``ModelCheckpoint`` and a ``CheckpointIO`` plugin, in safetensors and JSON.

Change one import to adopt it::

    from keepbest.lightning import ModelCheckpoint   # was: from lightning.pytorch.callbacks import ModelCheckpoint

or route every checkpoint Lightning writes through keepbest::

    trainer = Trainer(plugins=[keepbest.lightning.CheckpointIO()])
"""

from keepbest.lightning._callback import ModelCheckpoint
from keepbest.lightning._io import CheckpointIO

__all__ = ["CheckpointIO", "ModelCheckpoint"]
