"""The Lightning classes keepbest builds on: from ``lightning.pytorch`` (the ``lightning`` package) when it is
installed, else from ``pytorch_lightning``. A Trainer takes callbacks and plugins of its own package only."""

from __future__ import annotations

try:
    import lightning.pytorch as pl
    from lightning.fabric.utilities.cloud_io import get_filesystem
    from lightning.pytorch.callbacks import ModelCheckpoint as BaseModelCheckpoint
    from lightning.pytorch.plugins.io import CheckpointIO as BaseCheckpointIO
except ImportError:  # pragma: no cover - the dev set installs lightning
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from lightning_fabric.utilities.cloud_io import get_filesystem  # type: ignore[no-redef]
        from pytorch_lightning.callbacks import ModelCheckpoint as BaseModelCheckpoint  # type: ignore[assignment]
        from pytorch_lightning.plugins.io import CheckpointIO as BaseCheckpointIO  # type: ignore[assignment]
    except ImportError:
        raise ImportError("keepbest.lightning needs Lightning 2.6 (the lightning or pytorch-lightning package). "
                          "Install it: pip install 'keepbest[lightning]'") from None

__all__ = ["BaseCheckpointIO", "BaseModelCheckpoint", "get_filesystem", "pl"]
