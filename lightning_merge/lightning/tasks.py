"""LightningModules around Hugging Face models, for merging then evaluating or fine-tuning.

The Hugging Face model is the attribute ``model``, so ``MergeCallback(target="model")`` (or its
auto-detection) merges experts saved with ``save_pretrained`` into it. Batches are dicts with
``input_ids``, ``attention_mask`` and ``labels`` (the data modules of
:mod:`lightning_merge.lightning.data`).

Evaluation is per task: one validation / test dataloader per task, metrics logged as
``val/<task>/<metric>`` and their mean over the tasks as ``val/<metric>_mean`` (``test/`` for
test). Task names come from ``task_names``, else from the data module (``val_task_names`` /
``test_task_names`` / ``task_names``), else ``task0``, ``task1``, ...

Fine-tuning after the merge (``finetune``):

* ``"full"``: every parameter trains;
* ``"head"``: only the output head (the classifier of :class:`SequenceClassifier`, the output
  embeddings of :class:`CausalLM`);
* ``"lora"``: PEFT LoRA adapters (``lora_r``, ``lora_alpha``, ``lora_targets``; default targets:
  PEFT's per-architecture defaults, e.g. ``q_proj``/``v_proj``) on a frozen model. The adapters are
  added in ``configure_model``, which Lightning calls after the callbacks' ``setup``: the merge
  lands in the plain model, then LoRA trains on top of the merged weights. After that, ``model``
  is a ``peft.PeftModel`` (``model.save_pretrained(dir)`` writes the adapter).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["CausalLM", "SequenceClassifier"]

Finetune = Literal["full", "lora", "head"]
DType = Literal["float32", "bfloat16", "float16", "auto"]


class _HFTaskModule(pl.LightningModule):
    """Shared machinery: loading, fine-tuning modes, the optimizer and per-task metric bookkeeping."""

    def __init__(
        self,
        *,
        lr: float,
        weight_decay: float,
        finetune: Finetune,
        lora_r: int,
        lora_alpha: float,
        lora_dropout: float,
        lora_targets: list[str] | None,
        task_names: list[str] | None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if finetune not in ("full", "lora", "head"):
            raise ConfigError(f"{name}: finetune '{finetune}' is not one of ['full', 'lora', 'head']")
        if not lr > 0 or weight_decay < 0:
            raise ConfigError(f"{name}: lr must be > 0 and weight_decay >= 0 (got lr={lr}, "
                              f"weight_decay={weight_decay})")
        if finetune == "lora" and (lora_r < 1 or lora_alpha <= 0 or not 0 <= lora_dropout < 1):
            raise ConfigError(f"{name}: lora_r must be >= 1, lora_alpha > 0 and 0 <= lora_dropout < 1 (got "
                              f"{lora_r}, {lora_alpha}, {lora_dropout})")
        if task_names is not None and (not task_names or len(set(task_names)) != len(task_names)):
            raise ConfigError(f"{name}: task_names must be distinct names, got {task_names}")
        self.lr, self.weight_decay, self.finetune = lr, weight_decay, finetune
        self.lora_r, self.lora_alpha, self.lora_dropout = lora_r, lora_alpha, lora_dropout
        self.lora_targets = list(lora_targets) if lora_targets is not None else None
        self.task_names = list(task_names) if task_names is not None else None
        #: per-(stage, dataloader) metrics, created at the first batch of each dataloader
        self.eval_metrics = nn.ModuleDict()
        self._names: dict[str, list[str]] = {}

    # ---- model
    @staticmethod
    def _load(auto_cls: Any, path: str, dtype: DType, **kwargs: Any) -> nn.Module:
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        model = auto_cls.from_pretrained(path, dtype=torch_dtype, **kwargs)
        return model.train()  # from_pretrained returns eval mode; Lightning switches modes per loop

    def head_parameters(self) -> list[nn.Parameter]:
        """The parameters ``finetune="head"`` trains."""
        raise NotImplementedError

    def _freeze_to_head(self) -> None:
        head = {id(p) for p in self.head_parameters()}
        if not head:
            raise ConfigError(f"{type(self).__name__}: finetune='head' but the model has no separate head")
        for p in self.model.parameters():
            p.requires_grad_(id(p) in head)

    def configure_model(self) -> None:
        """Add the LoRA adapters (``finetune="lora"``), once; Lightning calls this after the callbacks'
        ``setup``, so a :class:`~lightning_merge.MergeCallback` has merged into the plain model."""
        if self.finetune != "lora":
            return
        from peft import LoraConfig, PeftModel, get_peft_model

        if isinstance(self.model, PeftModel):
            return
        config = LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                            target_modules=self.lora_targets)
        try:
            self.model = get_peft_model(self.model, config)
        except ValueError as e:  # unknown architecture without explicit targets, or targets not found
            raise ConfigError(f"{type(self).__name__}: cannot add LoRA adapters: {e} (set lora_targets, e.g. "
                              "['q_proj', 'v_proj'])") from None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(f"{type(self).__name__}: no trainable parameters (finetune='{self.finetune}')")
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    # ---- tasks and metrics
    def _n_loaders(self, stage: str) -> int | None:
        loaders = getattr(self.trainer, "val_dataloaders" if stage == "val" else "test_dataloaders", None)
        if loaders is None:
            return None
        return len(loaders) if isinstance(loaders, (list, tuple)) else 1

    def _resolve_names(self, stage: str) -> None:
        n = self._n_loaders(stage)
        names = self.task_names
        if names is None:
            dm = getattr(self.trainer, "datamodule", None)
            for attr in (f"{stage}_task_names", "task_names"):
                cand = getattr(dm, attr, None) if dm is not None else None
                if isinstance(cand, (list, tuple)) and (n is None or len(cand) == n):
                    names = list(cand)
                    break
        elif n is not None and len(names) != n:
            raise ConfigError(f"{type(self).__name__}: {len(names)} task_names {names} for {n} {stage} "
                              "dataloaders; give one name per dataloader, in order")
        self._names[stage] = list(names or [])

    def task_name(self, stage: str, idx: int) -> str:
        names = self._names.get(stage) or []
        return names[idx] if idx < len(names) else f"task{idx}"

    def on_validation_start(self) -> None:
        self._resolve_names("val")

    def on_test_start(self) -> None:
        self._resolve_names("test")

    def _metric(self, stage: str, idx: int) -> nn.Module:
        key = f"{stage}_{idx}"
        if key not in self.eval_metrics:
            self.eval_metrics[key] = self.make_metrics().to(self.device)
        return self.eval_metrics[key]

    def make_metrics(self) -> Any:
        raise NotImplementedError

    def _epoch_metrics(self, stage: str) -> dict[str, dict[str, float]]:
        """{task: {metric: value}} of every dataloader seen this epoch (metrics are reset)."""
        out: dict[str, dict[str, float]] = {}
        prefix = f"{stage}_"
        for key in sorted((k for k in self.eval_metrics if k.startswith(prefix)), key=lambda k: int(k[len(prefix):])):
            metric = self.eval_metrics[key]
            out[self.task_name(stage, int(key[len(prefix):]))] = self.compute_metrics(metric)
            metric.reset()
        return out

    def compute_metrics(self, metric: nn.Module) -> dict[str, float]:
        raise NotImplementedError

    def _log_value(self, name: str, value: float) -> None:
        # the values are already synchronized across ranks (torchmetrics); sync_dist only silences the warning
        self.log(name, float(value), on_step=False, on_epoch=True, add_dataloader_idx=False, sync_dist=True)

    def _log_epoch(self, stage: str) -> dict[str, dict[str, float]]:
        per_task = self._epoch_metrics(stage)
        prefix = stage
        for task, values in per_task.items():
            for k, v in values.items():
                self._log_value(f"{prefix}/{task}/{k}", v)
        if per_task:
            keys = dict.fromkeys(k for values in per_task.values() for k in values)
            for k in keys:
                vals = [values[k] for values in per_task.values() if k in values]
                self._log_value(f"{prefix}/{k}_mean", math.fsum(vals) / len(vals))
        return per_task

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")


class SequenceClassifier(_HFTaskModule):
    """A Hugging Face sequence classifier (``AutoModelForSequenceClassification``) as ``self.model``.

    Args:
        model: a Hugging Face model folder (offline: a local path).
        num_labels: number of classes (a checkpoint saved with another count is refused).
        lr, weight_decay: AdamW over the trainable parameters.
        finetune: ``"full"``, ``"head"`` (the classifier only) or ``"lora"`` (see the module doc).
        lora_r, lora_alpha, lora_dropout, lora_targets: the LoRA adapters of ``finetune="lora"``.
        task_names: names of the validation / test dataloaders, in order (default: the data
            module's, else ``task0``, ...).
        expert_scores: ``{task: accuracy of the task's own expert}`` (fractions, like
            ``val/<task>/acc``); adds ``<stage>/<task>/normalized`` = acc / expert acc and
            ``<stage>/normalized_mean``.
        dtype: the dtype the model is loaded in.

    Logs ``train/loss``; per validation (test) dataloader ``val/<task>/loss``, ``val/<task>/acc``,
    ``val/<task>/f1`` (macro); ``val/acc_mean``, ``val/f1_mean``, ``val/loss_mean`` over the tasks.
    """

    def __init__(
        self,
        model: str,
        num_labels: int,
        *,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        finetune: Finetune = "full",
        lora_r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        lora_targets: list[str] | None = None,
        task_names: list[str] | None = None,
        expert_scores: dict[str, float] | None = None,
        dtype: DType = "float32",
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, finetune=finetune, lora_r=lora_r, lora_alpha=lora_alpha,
                         lora_dropout=lora_dropout, lora_targets=lora_targets, task_names=task_names)
        if num_labels < 2:
            raise ConfigError(f"SequenceClassifier: num_labels must be >= 2, got {num_labels}")
        if expert_scores is not None:
            bad = {k: v for k, v in expert_scores.items() if not (isinstance(v, (int, float)) and v > 0)}
            if bad:
                raise ConfigError(f"SequenceClassifier: expert_scores must be positive accuracies, got {bad}")
        self.save_hyperparameters()
        self.num_labels = num_labels
        self.expert_scores = dict(expert_scores) if expert_scores is not None else None
        from transformers import AutoModelForSequenceClassification

        self.model = self._load(AutoModelForSequenceClassification, model, dtype, num_labels=num_labels)
        if getattr(self.model.config, "pad_token_id", None) is None:
            self._set_pad_token(model)
        if finetune == "head":
            self._freeze_to_head()

    def _set_pad_token(self, path: str) -> None:
        """Decoder classifiers pool the last non-pad token and need ``config.pad_token_id``."""
        pad = None
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(path)
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        except (OSError, ValueError):
            pass
        if pad is None:
            pad = getattr(self.model.config, "eos_token_id", None)
            pad = pad[0] if isinstance(pad, (list, tuple)) else pad
        if pad is not None:
            self.model.config.pad_token_id = pad

    def head_parameters(self) -> list[nn.Parameter]:
        backbone = {id(p) for p in self.model.base_model.parameters()}
        return [p for p in self.model.parameters() if id(p) not in backbone]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, **_: Any) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self(**batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def make_metrics(self) -> nn.Module:
        from torchmetrics import MeanMetric, MetricCollection
        from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

        return MetricCollection({
            "acc": MulticlassAccuracy(num_classes=self.num_labels, average="micro"),
            "f1": MulticlassF1Score(num_classes=self.num_labels, average="macro"),
            "loss": MeanMetric(),
        }, compute_groups=False)

    def compute_metrics(self, metric: nn.Module) -> dict[str, float]:
        return {k: float(v) for k, v in metric.compute().items()}

    def _eval_step(self, stage: str, batch: dict[str, Tensor], dataloader_idx: int) -> Tensor:
        out = self(**batch)
        labels = batch["labels"]
        m = self._metric(stage, dataloader_idx)
        preds = out.logits.argmax(-1)
        m["acc"].update(preds, labels)
        m["f1"].update(preds, labels)
        m["loss"].update(out.loss.detach(), weight=len(labels))
        return out.loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self._eval_step("test", batch, dataloader_idx)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """The predicted class of every example."""
        return self(batch["input_ids"], batch.get("attention_mask")).logits.argmax(-1)

    def _log_epoch(self, stage: str) -> dict[str, dict[str, float]]:
        per_task = super()._log_epoch(stage)
        if self.expert_scores and per_task:
            prefix = stage
            missing = [t for t in per_task if t not in self.expert_scores]
            if missing:
                rank_zero_warn(f"SequenceClassifier: expert_scores has no entry for task(s) {missing}; their "
                               "normalized scores are not logged")
            normalized = [per_task[t]["acc"] / self.expert_scores[t] for t in per_task if t in self.expert_scores]
            for t in per_task:
                if t in self.expert_scores:
                    self._log_value(f"{prefix}/{t}/normalized", per_task[t]["acc"] / self.expert_scores[t])
            if normalized:
                self._log_value(f"{prefix}/normalized_mean", math.fsum(normalized) / len(normalized))
        return per_task


class CausalLM(_HFTaskModule):
    """A Hugging Face causal language model (``AutoModelForCausalLM``) as ``self.model``.

    Args: as :class:`SequenceClassifier` (without ``num_labels`` / ``expert_scores``); the head of
    ``finetune="head"`` is the output embedding (shared with the input embedding when tied).

    Logs ``train/loss``; per validation (test) dataloader ``val/<task>/loss`` (mean next-token
    cross-entropy over the dataloader's tokens) and ``val/<task>/ppl`` = exp(loss); and their means
    over the tasks ``val/loss_mean``, ``val/ppl_mean``. Label ``-100`` marks ignored positions;
    without ``labels`` the batch's ``input_ids`` (padding masked out) are the labels.
    """

    def __init__(
        self,
        model: str,
        *,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        finetune: Finetune = "full",
        lora_r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        lora_targets: list[str] | None = None,
        task_names: list[str] | None = None,
        dtype: DType = "float32",
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, finetune=finetune, lora_r=lora_r, lora_alpha=lora_alpha,
                         lora_dropout=lora_dropout, lora_targets=lora_targets, task_names=task_names)
        self.save_hyperparameters()
        from transformers import AutoModelForCausalLM

        self.model = self._load(AutoModelForCausalLM, model, dtype)
        if finetune == "head":
            self._freeze_to_head()

    def head_parameters(self) -> list[nn.Parameter]:
        out = self.model.get_output_embeddings()
        return list(out.parameters()) if out is not None else []

    @staticmethod
    def labels_of(batch: dict[str, Tensor]) -> Tensor:
        labels = batch.get("labels")
        if labels is None:
            labels = batch["input_ids"].clone()
            if batch.get("attention_mask") is not None:
                labels[batch["attention_mask"] == 0] = -100
        return labels

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: Any) -> Tensor:
        """The logits."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def _token_nll(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(sum of next-token negative log-likelihoods, number of predicted tokens) of the batch."""
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        labels = self.labels_of(batch)[:, 1:]
        logits = logits[:, :-1].float()
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                          ignore_index=-100, reduction="sum")
        return nll, (labels != -100).sum()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        nll, count = self._token_nll(batch)
        loss = nll / count.clamp_min(1)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def make_metrics(self) -> nn.Module:
        from torchmetrics import MetricCollection, SumMetric

        return MetricCollection({"nll": SumMetric(), "tokens": SumMetric()}, compute_groups=False)

    def compute_metrics(self, metric: nn.Module) -> dict[str, float]:
        values = metric.compute()
        tokens = float(values["tokens"])
        loss = float(values["nll"]) / tokens if tokens else float("nan")
        return {"loss": loss, "ppl": math.exp(min(loss, 700.0))}

    def _eval_step(self, stage: str, batch: dict[str, Tensor], dataloader_idx: int) -> Tensor:
        nll, count = self._token_nll(batch)
        m = self._metric(stage, dataloader_idx)
        m["nll"].update(nll.detach().double())
        m["tokens"].update(count.double())
        return nll / count.clamp_min(1)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self._eval_step("test", batch, dataloader_idx)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """The greedy next token at every position."""
        return self(batch["input_ids"], batch.get("attention_mask")).argmax(-1)
