"""A shared Hugging Face encoder with one frozen linear head per task: merge the encoder, keep the heads.

Tasks that do not share a label space (sentiment, topic, ...) are merged the task-vector way: the
experts fine-tune the *encoder* of one pre-trained model, each against its task's head, and only the
encoder is merged. The heads are fitted once on the frozen base model (a linear probe on a separate
split, :func:`fit_probe_heads`) and stay frozen, so every expert and every merge is scored through
the same heads and the score differences come from the encoder alone.

``EncoderClassifier`` is a LightningModule:

* ``model``: ``AutoModel.from_pretrained(model)`` (e.g. a BERT encoder); ``MergeCallback(target="model")``
  merges expert encoders saved with ``save_pretrained`` (or :meth:`save_encoder`) into it;
* ``heads``: ``nn.ModuleDict`` task -> ``nn.Linear(hidden, classes)``, read from ``heads`` (a
  safetensors file written by :func:`fit_probe_heads`), frozen unless ``train_heads``;
* the sentence embedding is the attention-masked mean of the last hidden states
  (``h = sum_t m_t x_t / sum_t m_t``), as sentence-transformers pools MiniLM;
* batches carry ``task`` (the index into the data module's ``task_names``, added by
  :class:`~lightning_merge.lightning.data.TextClassificationDataModule`), so a training batch may mix
  tasks (multi-task fine-tuning after a merge) and each row goes through its own task's head;
* ``freeze``: substrings of parameter names that never train (default: the word embeddings, which
  keeps the experts' vocabulary rows identical to the base's).

Validation / test: one dataloader per task, logged as in :mod:`lightning_merge.lightning.tasks`
(``val/<task>/acc``, ``val/<task>/f1``, ``val/acc_mean``, ...; ``normalized`` with ``expert_scores``).

Learned merges: :meth:`EncoderClassifier.task_logits` gives the ``[B, C]`` logits of a batch of one
task, and :class:`TaskLogits` wraps the classifier as a model of keyword inputs for
:class:`~lightning_merge.learned.LearnedMerge` (``target="classifier.model"``: AdaMerging / DAM learn
the encoder's merge coefficients through the frozen heads; ``export(target_only=True)`` writes the
merged encoder as a folder ``EncoderClassifier`` loads).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import ConfigError
from ..lightning.tasks import DType, Finetune, _HFTaskModule
from ..targets.atomic import atomic_file

log = logging.getLogger(__name__)

__all__ = ["EncoderClassifier", "TaskLogits", "fit_probe_heads", "load_heads", "mean_pool", "save_heads"]


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """``sum_t m_t h_t / max(1, sum_t m_t)`` over the sequence axis."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def save_heads(path: str | os.PathLike, heads: Mapping[str, nn.Linear]) -> None:
    """Write the heads as one safetensors file (``<task>.weight`` / ``<task>.bias``), atomically."""
    from safetensors.torch import save_file

    tensors = {}
    for task, lin in heads.items():
        tensors[f"{task}.weight"] = lin.weight.detach().cpu().contiguous()
        tensors[f"{task}.bias"] = lin.bias.detach().cpu().contiguous()
    atomic_file(path, lambda tmp: save_file(tensors, str(tmp), metadata={"tasks": ",".join(heads)}))


#: what ``heads`` may be: a file (safetensors from :func:`save_heads`, or a ``.pt`` / ``.pth`` torch file
#: holding one of the mappings), ``{task: nn.Linear}``, or a state dict ``{"<task>.weight": W, "<task>.bias": b}``
HeadsSpec = str | os.PathLike | Mapping[str, Any]


def load_heads(spec: HeadsSpec) -> dict[str, nn.Linear]:
    """The task heads from any :data:`HeadsSpec`, in their given (or saved) order."""
    if isinstance(spec, Mapping):
        return _heads_from_mapping(spec, "heads")
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"heads file '{path}' does not exist (write it with fit_probe_heads / save_heads)")
    if path.suffix in (".pt", ".pth", ".bin"):
        loaded = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"heads file '{path}' holds a {type(loaded).__name__}; save a dict task -> nn.Linear "
                              "or a state dict {'<task>.weight': ..., '<task>.bias': ...}")
        return _heads_from_mapping(loaded, f"heads file '{path}'")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        tasks = (fh.metadata() or {}).get("tasks", "")
        order = [t for t in tasks.split(",") if t]
        state = {k: fh.get_tensor(k) for t in order for k in (f"{t}.weight", f"{t}.bias")}
    if not order:
        raise ConfigError(f"heads file '{path}' names no tasks in its metadata")
    return _heads_from_mapping(state, f"heads file '{path}'")


def _heads_from_mapping(heads: Mapping[str, Any], where: str) -> dict[str, nn.Linear]:
    if heads and all(isinstance(v, nn.Linear) for v in heads.values()):
        return dict(heads)
    tasks: dict[str, dict[str, Tensor]] = {}
    for key, value in heads.items():
        task, _, part = str(key).rpartition(".")
        if not task or part not in ("weight", "bias") or not isinstance(value, Tensor):
            raise ConfigError(f"{where}: '{key}' is neither a head (nn.Linear) nor '<task>.weight' / '<task>.bias' "
                              "tensor")
        tasks.setdefault(task, {})[part] = value
    out = {}
    for task, parts in tasks.items():
        w = parts.get("weight")
        if w is None or w.dim() != 2:
            raise ConfigError(f"{where}: head '{task}' needs a 2-D '{task}.weight' [classes, hidden]")
        lin = nn.Linear(w.shape[1], w.shape[0], bias="bias" in parts)
        with torch.no_grad():
            lin.weight.copy_(w)
            if "bias" in parts:
                lin.bias.copy_(parts["bias"])
        out[task] = lin
    if not out:
        raise ConfigError(f"{where}: no heads")
    return out


@torch.no_grad()
def embed(encoder: nn.Module, loader: Any) -> tuple[Tensor, Tensor]:
    """(mean-pooled embeddings, labels) of every batch of ``loader``, in evaluation mode."""
    was_training = encoder.training
    encoder.eval()
    xs, ys = [], []
    try:
        for batch in loader:
            out = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            xs.append(mean_pool(out.last_hidden_state, batch["attention_mask"]).float())
            ys.append(batch["labels"])
    finally:
        encoder.train(was_training)
    return torch.cat(xs), torch.cat(ys)


def fit_linear_probe(x: Tensor, y: Tensor, num_classes: int, *, l2: float = 1e-3, max_iter: int = 200) -> nn.Linear:
    """Multinomial logistic regression ``min_W,b mean CE(W x + b, y) + l2 ||W||^2`` by L-BFGS (float64)."""
    x64 = x.double()
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x64 @ w.T + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    lin = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        lin.weight.copy_(w.float())
        lin.bias.copy_(b.float())
    return lin


def fit_probe_heads(encoder: nn.Module, loaders: Mapping[str, Any], num_classes: Mapping[str, int], *,
                    l2: float = 1e-3) -> dict[str, nn.Linear]:
    """One linear head per task, fitted on the frozen ``encoder``'s mean-pooled embeddings of ``loaders[task]``."""
    heads = {}
    for task, loader in loaders.items():
        x, y = embed(encoder, loader)
        heads[task] = fit_linear_probe(x, y, num_classes[task], l2=l2)
        acc = float((heads[task](x).argmax(-1) == y).float().mean())
        log.info("probe head '%s': %d examples, %d classes, training accuracy %.3f", task, len(y),
                 num_classes[task], acc)
    return heads


class EncoderClassifier(_HFTaskModule):
    """A shared encoder (``model``) and frozen per-task linear heads (``heads``); see the module doc.

    Args:
        model: a Hugging Face encoder folder (``AutoModel``).
        heads: the task heads: the safetensors file of :func:`save_heads`, a ``.pt`` file, a dict
            task -> ``nn.Linear`` or a state dict (:data:`HeadsSpec`); their task names must cover the
            data module's task names.
        lr, weight_decay: AdamW over the trainable parameters.
        finetune: ``"full"`` (the encoder, minus ``freeze``), ``"lora"`` (PEFT adapters on
            ``lora_targets``, default ``["query", "value"]``) or ``"head"`` (the heads only).
        freeze: substrings of encoder parameter names kept frozen in ``"full"`` mode.
        train_heads: also train the heads (``"full"``/``"lora"``); default False.
        expert_scores: ``{task: accuracy}`` of each task's own expert; adds ``normalized`` scores.
        dtype: the dtype the encoder is loaded in.
    """

    def __init__(
        self,
        model: str,
        heads: HeadsSpec,
        *,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        finetune: Finetune = "full",
        freeze: list[str] | None = None,
        train_heads: bool = False,
        lora_r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        lora_targets: list[str] | None = None,
        expert_scores: dict[str, float] | None = None,
        dtype: DType = "float32",
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, finetune=finetune, lora_r=lora_r, lora_alpha=lora_alpha,
                         lora_dropout=lora_dropout,
                         lora_targets=lora_targets if lora_targets is not None else ["query", "value"],
                         task_names=None)
        self.save_hyperparameters()
        from transformers import AutoModel

        self.model = self._load(AutoModel, model, dtype)
        self.heads = nn.ModuleDict(load_heads(heads))
        hidden = getattr(self.model.config, "hidden_size", None)
        for task, lin in self.heads.items():
            if hidden is not None and lin.in_features != hidden:
                raise ConfigError(f"EncoderClassifier: head '{task}' takes {lin.in_features} inputs, the "
                                  f"encoder '{model}' has hidden size {hidden}")
        self.freeze = list(freeze) if freeze is not None else ["embeddings.word_embeddings"]
        self.train_heads = bool(train_heads)
        self.expert_scores = dict(expert_scores) if expert_scores is not None else None
        self._apply_freeze()
        #: when a dict, ``_eval_step`` appends each batch's per-example correctness to
        #: ``outcomes[(stage, dataloader_idx)]`` (for confidence intervals over test examples)
        self.outcomes: dict[tuple[str, int], list[Tensor]] | None = None
        #: data-module task index -> head index (set at ``setup`` from the data module's task names)
        self.register_buffer("task_map", torch.arange(len(self.heads)), persistent=False)

    # ---- parameters
    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())

    def _apply_freeze(self) -> None:
        if self.finetune == "head":
            self._freeze_to_head()
            return
        for name, p in self.model.named_parameters():
            p.requires_grad_(self.finetune == "full" and not any(s in name for s in self.freeze))
        for p in self.heads.parameters():
            p.requires_grad_(self.train_heads)

    def _freeze_to_head(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.heads.parameters():
            p.requires_grad_(True)

    def configure_model(self) -> None:
        super().configure_model()
        if self.finetune == "lora":
            for p in self.heads.parameters():
                p.requires_grad_(self.train_heads)

    # ---- tasks
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(dm, "task_names", None)
        if names is None:
            return
        self.set_task_names(names)

    def set_task_names(self, names: Sequence[str]) -> None:
        """Route data-module task index ``i`` (a batch's ``task``) to the head named ``names[i]``."""
        missing = [t for t in names if t not in self.heads]
        if missing:
            raise ConfigError(f"EncoderClassifier: no head for task(s) {missing} of the data module; the heads file "
                              f"has {list(self.heads)}")
        order = list(self.heads)
        self.task_map = torch.tensor([order.index(t) for t in names], device=self.task_map.device)

    # ---- forward
    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return mean_pool(out.last_hidden_state, attention_mask)

    def grouped_logits(self, input_ids: Tensor, attention_mask: Tensor, task: Tensor) -> list[tuple[Tensor, Tensor]]:
        """``[(rows, logits of those rows)]``, one entry per head present in the batch (rows: indices)."""
        h = self.embed(input_ids, attention_mask)
        heads = list(self.heads.values())
        idx = self.task_map[task]
        return [(rows, heads[k](h[rows])) for k in idx.unique().tolist() for rows in [(idx == k).nonzero().flatten()]]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, task: Tensor, **_: Any) -> list[Tensor]:
        """Per-row logits (a list: the tasks may have different class counts), row ``i`` through head ``task[i]``."""
        logits: list[Tensor | None] = [None] * len(task)
        for rows, out in self.grouped_logits(input_ids, attention_mask, task):
            for j, r in enumerate(rows.tolist()):
                logits[r] = out[j]
        return logits  # type: ignore[return-value]

    def task_logits(self, input_ids: Tensor, attention_mask: Tensor, task: Tensor | int) -> Tensor:
        """The ``[B, C]`` logits of a batch of ONE task (data-module index ``task``, an int or a tensor
        whose entries are all equal) through that task's head: ``torch.stack(self(...))``, batched."""
        if isinstance(task, Tensor):
            ids = task.unique()
            if ids.numel() != 1:
                raise ConfigError(f"EncoderClassifier.task_logits: the batch mixes tasks {ids.tolist()}; it takes the "
                                  "rows of one task (use forward() for mixed batches)")
            task = int(ids)
        head = list(self.heads.values())[int(self.task_map[task])]
        return head(self.embed(input_ids, attention_mask))

    def _loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(mean cross-entropy over the rows, predicted class per row), one head call per task present."""
        labels = batch["labels"]
        total = labels.new_zeros((), dtype=torch.float32)
        preds = torch.empty_like(labels)
        for rows, logits in self.grouped_logits(batch["input_ids"], batch["attention_mask"], batch["task"]):
            total = total + F.cross_entropy(logits.float(), labels[rows], reduction="sum")
            preds[rows] = logits.argmax(-1)
        return total / len(labels), preds

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    # ---- metrics
    def _metric_for(self, stage: str, idx: int, task: int) -> nn.Module:
        """The metrics of dataloader ``idx``, sized by the head of the (data-module) task index ``task``."""
        key = f"{stage}_{idx}"
        if key not in self.eval_metrics:
            head = list(self.heads.values())[int(self.task_map[task])]
            self.eval_metrics[key] = self.make_metrics(head.out_features).to(self.device)
        return self.eval_metrics[key]

    def make_metrics(self, num_classes: int = 2) -> nn.Module:  # type: ignore[override]
        from torchmetrics import MeanMetric, MetricCollection
        from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

        return MetricCollection({
            "acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
            "f1": MulticlassF1Score(num_classes=num_classes, average="macro"),
            "loss": MeanMetric(),
        }, compute_groups=False)

    def compute_metrics(self, metric: nn.Module) -> dict[str, float]:
        return {k: float(v) for k, v in metric.compute().items()}

    def _eval_step(self, stage: str, batch: dict[str, Tensor], dataloader_idx: int) -> Tensor:
        loss, preds = self._loss(batch)
        m = self._metric_for(stage, dataloader_idx, int(batch["task"][0]))
        m["acc"].update(preds, batch["labels"])
        m["f1"].update(preds, batch["labels"])
        m["loss"].update(loss.detach(), weight=len(preds))
        if self.outcomes is not None:
            self.outcomes.setdefault((stage, dataloader_idx), []).append((preds == batch["labels"]).cpu())
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self._eval_step("test", batch, dataloader_idx)

    def _log_epoch(self, stage: str) -> dict[str, dict[str, float]]:
        per_task = super()._log_epoch(stage)
        if self.expert_scores and per_task:
            normalized = {t: v["acc"] / self.expert_scores[t] for t, v in per_task.items() if t in self.expert_scores}
            for t, v in normalized.items():
                self._log_value(f"{stage}/{t}/normalized", v)
            if normalized:
                self._log_value(f"{stage}/normalized_mean", math.fsum(normalized.values()) / len(normalized))
        return per_task

    # ---- output
    def save_expert(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write the encoder as an expert for ``MergeCallback``, atomically: a Hugging Face folder after a
        full fine-tune, a PEFT adapter folder after a LoRA fine-tune (merged in exact dense-delta space)."""
        from ..targets.atomic import atomic_output_dir

        with atomic_output_dir(Path(path), overwrite=overwrite) as tmp:
            self.model.save_pretrained(tmp)


class TaskLogits(nn.Module):
    """An :class:`EncoderClassifier` as a plain model of Hugging Face-style keyword inputs, for
    :class:`~lightning_merge.learned.LearnedMerge` (AdaMerging / DAM over the shared encoder).

    ``forward(input_ids=..., attention_mask=..., task=...)`` returns the ``[B, C]`` logits tensor of
    a batch of one task (:meth:`EncoderClassifier.task_logits`); other keywords (``labels``) are
    ignored. The encoder is ``classifier.model``, so ``LearnedMerge(TaskLogits(clf), experts,
    target="classifier.model")`` merges the encoder only; the heads are not a merge target and stay
    as they are (frozen).

    Args:
        classifier: the encoder and its task heads.
        task_names: the data module's task names (batch ``task`` ``i`` is ``task_names[i]``);
            default: the heads file's order.
    """

    def __init__(self, classifier: EncoderClassifier, task_names: Sequence[str] | None = None) -> None:
        super().__init__()
        self.classifier = classifier
        if task_names is not None:
            classifier.set_task_names(task_names)

    @property
    def encoder(self) -> nn.Module:
        return self.classifier.model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, task: Tensor | int, **_: Any) -> Tensor:
        return self.classifier.task_logits(input_ids, attention_mask, task)
