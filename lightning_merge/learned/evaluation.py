"""Validation of a learned merge: the merged model on every task, the per-task means logged.

A mixin of :class:`~lightning_merge.learned.LearnedMerge` (it uses ``merged_params``, ``call`` and
the trainer): θ*(c) is built once per validation epoch and every task's batches run through it;
``val/{task}/entropy``, ``val/{task}/loss`` and ``val/{task}/acc`` are logged per task, and
``val/acc_mean`` / ``val/entropy_mean`` as the mean over the tasks of each task's value over all
its examples (summed over the ranks).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .objectives import entropy, logits_of, model_inputs, split_tasks, task_loss, token_mask

__all__ = ["MergedValidation"]


class MergedValidation:
    """The validation hooks of a learned merge (see the module doc)."""

    _val_params: dict[str, Tensor] | None
    _val_sums: dict[str, Tensor]
    trainer: Any

    def on_validation_epoch_start(self) -> None:
        with torch.no_grad():
            self._val_params = {k: v.detach() for k, v in self.merged_params().items()}
        self._val_sums: dict[str, Tensor] = {}

    def on_validation_epoch_end(self) -> None:
        """Log ``val/acc_mean`` and ``val/entropy_mean``: the mean over the tasks of each task's
        value over all its examples (summed over the ranks)."""
        self._val_params = None
        for metric in ("acc", "entropy"):
            per_task = []
            for key, sums in sorted(self._val_sums.items()):
                if key.endswith(f"/{metric}"):
                    total = self.trainer.strategy.reduce(sums.clone(), reduce_op="sum")
                    per_task.append(total[0] / total[1].clamp_min(1))
            if per_task:
                self.log(f"val/{metric}_mean", torch.stack(per_task).mean(), add_dataloader_idx=False, sync_dist=True)
        self._val_sums = {}

    def _accumulate(self, key: str, values: Tensor) -> None:
        sums = self._val_sums.setdefault(key, torch.zeros(2, dtype=torch.float64, device=values.device))
        sums += torch.stack([values.double().sum(), torch.tensor(float(values.numel()), device=values.device)])

    def _task_name(self, idx: int) -> str:
        dm = getattr(self.trainer, "datamodule", None)
        names = getattr(dm, "val_task_names", None) or getattr(dm, "task_names", None) or []
        return names[idx] if idx < len(names) else f"task{idx}"

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        params = self._val_params if self._val_params is not None else self.merged_params()
        for task, b in split_tasks(batch).items():
            name = task or self._task_name(dataloader_idx)
            inputs = model_inputs(b, labels=True)
            out = self.call(params, inputs)
            z = logits_of(out)
            size = len(z)
            kw = dict(on_epoch=True, add_dataloader_idx=False, sync_dist=True, batch_size=size)
            h = entropy(z, token_mask(z, inputs))
            self.log(f"val/{name}/entropy", h, **kw)
            self._accumulate(f"{name}/entropy", h.detach().expand(size))
            labels = inputs.get("labels")
            if isinstance(labels, Tensor):
                self.log(f"val/{name}/loss", task_loss(out, inputs), **kw)
                if z.dim() == 2 and labels.dim() == 1:
                    hits = (z.argmax(-1) == labels).float()
                    self.log(f"val/{name}/acc", hits.mean(), **kw)
                    self._accumulate(f"{name}/acc", hits)

