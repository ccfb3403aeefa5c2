"""Per-task training batches for the data-aware merges (DAM, Sens-Merging calibration).

DAM pairs every expert with its own dataset: each training step needs one batch *per task*. Any
data module whose ``train_dataloader()`` returns a dict ``{task: DataLoader}`` provides that
(Lightning iterates the loaders together and hands ``training_step`` a dict ``{task: batch}``);
:class:`PerTaskTokensDataModule` is the synthetic one the recipes use.
"""

from __future__ import annotations

from torch.utils.data import DataLoader

from ..lightning.data import SyntheticTokensDataModule

__all__ = ["PerTaskTokensDataModule"]


class PerTaskTokensDataModule(SyntheticTokensDataModule):
    """:class:`~lightning_merge.lightning.data.SyntheticTokensDataModule` whose training batches are
    dicts ``{task: batch}`` with ``batch_size`` examples of every task of ``train_tasks``.

    Validation and test are unchanged (one dataloader per task).
    """

    def train_dataloader(self) -> dict[str, DataLoader]:  # type: ignore[override]
        return {t: self._loader(self.dataset("train", t), shuffle=True) for t in self.train_tasks}
