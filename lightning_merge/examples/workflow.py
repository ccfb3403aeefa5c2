"""The steps of a merge experiment on text tasks, each one a real Lightning run: shared by ``make demo``
and the quality benchmark.

1. :func:`prepare_heads`: a linear probe per task on the frozen base encoder (``probe`` split),
   saved once as the heads file every later model uses (:mod:`lightning_merge.examples.encoder`);
2. :func:`train_expert`: ``trainer.fit`` of an :class:`EncoderClassifier` on one task's ``train``
   split (full fine-tune or LoRA), saved as an HF folder or a PEFT adapter; cached;
3. :func:`evaluate`: ``trainer.test`` (or ``validate``) of the base encoder with any callbacks, e.g. a
   :class:`~lightning_merge.MergeCallback` that merges the experts at test time; returns
   ``{task: accuracy}``.

An :class:`Experiment` names the inputs: the base encoder folder, the data files per task and split
(:func:`lightning_merge.examples.corpora.prepare`), the heads file, and the loader settings.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from ..errors import ConfigError
from ..lightning.data import TextClassificationDataModule
from .encoder import EncoderClassifier, fit_probe_heads, save_heads

log = logging.getLogger(__name__)

__all__ = ["Experiment", "evaluate", "prepare_heads", "quiet_runtime", "train_expert"]


def quiet_runtime(threads: int) -> None:
    """For scripts that run many short Lightning jobs: ``threads`` torch threads, and Lightning /
    transformers info lines, progress bars and warnings silenced (the scripts report themselves)."""
    import warnings

    from transformers.utils import logging as hf_logging

    for name in ("lightning", "lightning.pytorch", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero", "lightning_merge", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)


@dataclass
class Experiment:
    """Inputs of a text-task merge experiment.

    ``files[task][split]`` are JSONL files (``probe``, ``train``, ``val``, ``test``); ``heads`` is
    where :func:`prepare_heads` writes (or has written) the heads.
    """

    base: str
    files: dict[str, dict[str, str]]
    heads: str
    max_length: int = 64
    batch_size: int = 32
    eval_batch_size: int = 128
    tasks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.tasks:
            self.tasks = list(self.files)
        for t in self.tasks:
            if t not in self.files:
                raise ConfigError(f"Experiment: task '{t}' has no data files")

    def datamodule(self, *, train_task: str | None = None, eval_split: str = "test",
                   tasks: Sequence[str] | None = None, batch_size: int | None = None) -> TextClassificationDataModule:
        """Training rows of ``train_task`` (or of every task), evaluation on ``eval_split`` of every task."""
        tasks = list(tasks or self.tasks)
        train = {t: self.files[t]["train"] for t in ([train_task] if train_task else tasks)}
        evals = {t: self.files[t][eval_split] for t in tasks}
        return TextClassificationDataModule(
            tokenizer=self.base, train_files=train, val_files=evals if eval_split != "test" else None,
            test_files=evals if eval_split == "test" else None, max_length=self.max_length,
            batch_size=batch_size or self.batch_size)

    def module(self, **kwargs: Any) -> EncoderClassifier:
        return EncoderClassifier(self.base, self.heads, **kwargs)


def _trainer(**kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                    enable_model_summary=False, enable_progress_bar=False)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def prepare_heads(exp: Experiment, *, overwrite: bool = False) -> str:
    """Fit (or reuse) the per-task probe heads on the frozen base encoder; return the heads path."""
    if Path(exp.heads).is_file() and not overwrite:
        return exp.heads
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(exp.base)
    loaders, classes = {}, {}
    for task in exp.tasks:
        dm = TextClassificationDataModule(tokenizer=exp.base, test_files={task: exp.files[task]["probe"]},
                                          max_length=exp.max_length, batch_size=exp.eval_batch_size)
        dm.setup("test")
        loaders[task] = dm.test_dataloader()[0]
        classes[task] = _num_classes(exp, task, dm.num_labels)
    Path(exp.heads).parent.mkdir(parents=True, exist_ok=True)
    save_heads(exp.heads, fit_probe_heads(encoder, loaders, classes))
    return exp.heads


def _num_classes(exp: Experiment, task: str, seen: int) -> int:
    labels = Path(exp.files[task]["probe"]).with_name("labels.json")
    return len(json.loads(labels.read_text())) if labels.is_file() else seen


def train_expert(exp: Experiment, task: str, out: str | os.PathLike, *, finetune: str = "full",
                 epochs: int = 1, max_steps: int = -1, lr: float = 1e-4, seed: int = 0,
                 lora_r: int = 8, lora_alpha: float = 16, overwrite: bool = False, **trainer_kwargs: Any) -> str:
    """``trainer.fit`` on ``task``'s training rows, save the expert to ``out`` (reused when it exists)."""
    out = Path(out)
    if out.is_dir() and not overwrite and any(out.glob("*.safetensors")):
        log.info("expert '%s': reusing %s", task, out)
        return str(out)
    pl.seed_everything(seed, workers=True, verbose=False)
    module = exp.module(finetune=finetune, lr=lr, lora_r=lora_r, lora_alpha=lora_alpha)
    dm = exp.datamodule(train_task=task, tasks=[task])
    trainer = _trainer(max_epochs=epochs, max_steps=max_steps, limit_val_batches=0, **trainer_kwargs)
    trainer.fit(module, datamodule=dm)
    module.save_expert(out, overwrite=True)
    return str(out)


def evaluate(exp: Experiment, *, callbacks: Sequence[pl.Callback] = (), model: str | None = None,
             split: str = "test", tasks: Sequence[str] | None = None, outcomes: dict[str, Tensor] | None = None,
             **trainer_kwargs: Any) -> dict[str, float]:
    """Accuracy per task of the base encoder (or ``model``) after ``callbacks`` acted (e.g. merged).

    ``outcomes``: a dict that receives, per task, the per-example correctness (a bool tensor in the
    data module's evaluation order, the same for every model), for paired comparisons.
    """
    torch.manual_seed(0)
    module = EncoderClassifier(model or exp.base, exp.heads)
    if outcomes is not None:
        module.outcomes = {}
    tasks = list(tasks or exp.tasks)
    dm = exp.datamodule(eval_split=split, tasks=tasks, batch_size=exp.eval_batch_size)
    trainer = _trainer(callbacks=list(callbacks), **trainer_kwargs)
    stage = "test" if split == "test" else "val"
    run = trainer.test if stage == "test" else trainer.validate
    metrics = run(module, datamodule=dm, verbose=False)
    flat: dict[str, float] = {}
    for m in metrics:
        flat.update({k: float(v) for k, v in m.items()})
    if outcomes is not None and module.outcomes is not None:
        for i, t in enumerate(tasks):
            outcomes[t] = torch.cat(module.outcomes[(stage, i)])
    return {t: flat[f"{stage}/{t}/acc"] for t in tasks}
