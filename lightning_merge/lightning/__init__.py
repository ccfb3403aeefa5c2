"""The PyTorch Lightning layer: callbacks that merge experts into a LightningModule (the only
part of lightning_merge that imports ``lightning``)."""

from .callback import MergeCallback, MergeSetupError, group_of, split_tasks

__all__ = ["MergeCallback", "MergeSetupError", "group_of", "split_tasks"]
