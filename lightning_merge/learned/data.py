"""Per-task training batches for the data-aware merges (DAM, Sens-Merging calibration).

DAM pairs every expert with its own dataset: each training step needs one batch *per task*. Any
data module whose ``train_dataloader()`` returns a dict ``{task: DataLoader}`` provides that
(Lightning iterates the loaders together, cycling the shorter ones until the longest is exhausted
(``max_size_cycle``), and hands ``training_step`` a dict ``{task: batch}``):
:class:`PerTaskTokensDataModule` is the synthetic one the recipes use,
:class:`PerTaskTextDataModule` the one for text-classification files.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from ..errors import ConfigError
from ..lightning.data import SyntheticTokensDataModule, TextClassificationDataModule

__all__ = ["PerTaskTextDataModule", "PerTaskTokensDataModule"]


class PerTaskTokensDataModule(SyntheticTokensDataModule):
    """:class:`~lightning_merge.lightning.data.SyntheticTokensDataModule` whose training batches are
    dicts ``{task: batch}`` with ``batch_size`` examples of every task of ``train_tasks``.

    Validation and test are unchanged (one dataloader per task).
    """

    def train_dataloader(self) -> dict[str, DataLoader]:  # type: ignore[override]
        return {t: self._loader(self.dataset("train", t), shuffle=True) for t in self.train_tasks}


class PerTaskTextDataModule(TextClassificationDataModule):
    """:class:`~lightning_merge.lightning.data.TextClassificationDataModule` whose training batches
    are dicts ``{task: batch}``: ``batch_size`` rows of every task of ``train_files`` (each batch's
    ``task`` entries all equal that task's index in :attr:`task_names`).

    Each task's rows are shuffled with its own generator seeded by ``seed`` + the task's index, so
    the batch sequence is the same on every run. Validation and test are unchanged (one dataloader
    per task). The other arguments are :class:`TextClassificationDataModule`'s (``train_task`` is
    refused: every training file is used).
    """

    def __init__(self, tokenizer: str, *, seed: int = 0, **kwargs: Any) -> None:
        if kwargs.get("train_task") is not None:
            raise ConfigError("PerTaskTextDataModule: train_task is not supported (every training batch holds "
                              "rows of every task of train_files); pass only the tasks you want as train_files")
        super().__init__(tokenizer, **kwargs)
        self.seed = seed

    @property
    def train_tasks(self) -> list[str]:
        """The tasks of the training batches, in ``train_files`` order (DAM's default expert order)."""
        return list(self.files["train"])

    def train_dataloader(self) -> dict[str, DataLoader]:  # type: ignore[override]
        data = self._split("train")
        loaders = {}
        for task in self.train_tasks:
            gen = torch.Generator().manual_seed(self.seed + self.task_names.index(task))
            loaders[task] = DataLoader(data[task], batch_size=self.batch_size, shuffle=True, generator=gen,
                                       num_workers=self.num_workers, collate_fn=self._collate)
        return loaders
