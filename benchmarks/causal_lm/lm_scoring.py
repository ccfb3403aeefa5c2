"""Accuracy of a causal LM by the likelihood of each label word: :func:`answer_logprobs` and :class:`LabelWordLM`.

Scoring. For a prompt x (right-padded in its batch) the model's next-token distribution at the last
real position, log p(· | x) = log_softmax(W h_last), is computed once; the class score of label word
w_c is log p(first token of w_c | x) and the prediction is argmax_c. One forward per example scores
every class. When every label word is a single token (true for the benchmark's words on
SmolLM2's tokenizer; :func:`lm_data.label_token_ids` tells), this *is* the full label-word
log-likelihood log p(w_c | x). Padding on the right does not change a causal model's hidden state
at a real position, so a prompt scores the same alone or in any batch (up to float rounding).

Training (``trainer.fit``) minimises −log p(answer token | x), the same next-token cross-entropy as
:class:`~lightning_merge.lightning.tasks.CausalLM` with every prompt position's label set to −100
and only the answer token's kept, computed at the one position that is not ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_merge.errors import ConfigError
from lightning_merge.lightning.tasks import CausalLM


def answer_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """log p(· | x) at each row's last real position, [batch, vocab] float32, one forward.

    ``model``: a Hugging Face causal LM (or a ``peft.PeftModel`` around one: the adapters are injected
    in its decoder layers). Only the last real position goes through the output head.
    """
    decoder = model.get_decoder()
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    last = attention_mask.sum(-1) - 1
    h = hidden[torch.arange(len(last), device=hidden.device), last]
    logits = model.get_output_embeddings()(h).float()
    return torch.log_softmax(logits, dim=-1)


class LabelWordLM(CausalLM):
    """A :class:`CausalLM` scored by label-word likelihood (see the module doc) and trained on answers.

    Args:
        model: a Hugging Face causal-LM folder.
        label_ids: ``{task: [answer token id of class 0, 1, ...]}``.
        train_layers: with ``finetune="full"``, only these decoder blocks (``model.layers.<i>``) and
            the final norm train; the tied embeddings stay frozen. None: :class:`CausalLM`'s rule.
        **kwargs: :class:`CausalLM`'s (``lr``, ``finetune``, ``lora_targets``, ``task_names``, ...).

    Logs ``<stage>/<task>/acc`` and ``<stage>/<task>/loss`` (mean −log p(true label word | x)), and
    their means ``<stage>/acc_mean`` / ``<stage>/loss_mean``. After each evaluation epoch
    :attr:`outcomes` holds ``{(stage, task): {idx: (correct, log p(true word), predicted class)}}``
    gathered from every rank (duplicates the distributed sampler pads with collapse on ``idx``).
    """

    def __init__(self, model: str, label_ids: Mapping[str, Sequence[int]], *,
                 train_layers: Sequence[int] | None = None, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        if not label_ids or any(len(v) < 2 for v in label_ids.values()):
            raise ConfigError(f"LabelWordLM: label_ids needs >= 2 answer tokens per task, got {dict(label_ids)}")
        self.label_ids = {t: list(v) for t, v in label_ids.items()}
        self.train_layers = None if train_layers is None else sorted(set(int(i) for i in train_layers))
        if self.train_layers is not None:
            if self.finetune != "full":
                raise ConfigError("LabelWordLM: train_layers needs finetune='full'")
            n = self.model.config.num_hidden_layers
            bad = [i for i in self.train_layers if not 0 <= i < n]
            if bad:
                raise ConfigError(f"LabelWordLM: train_layers {bad} outside the model's {n} blocks")
            keep = tuple(f"model.layers.{i}." for i in self.train_layers) + ("model.norm.",)
            for name, p in self.model.named_parameters():
                p.requires_grad_(name.startswith(keep))
        self.outcomes: dict[tuple[str, str], dict[int, tuple[bool, float, int]]] = {}
        self._pending: dict[tuple[str, str], list[tuple[int, bool, float, int]]] = {}

    def trained_state(self) -> dict[str, Tensor]:
        """The tensors ``finetune="full"`` with ``train_layers`` changes (an upper-block expert)."""
        return {n: p.detach().clone().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        lp = answer_logprobs(self.model, batch["input_ids"], batch["attention_mask"])
        loss = -lp.gather(1, batch["target"][:, None]).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(lp))
        return loss

    def make_metrics(self) -> nn.Module:
        from torchmetrics import MetricCollection, SumMetric

        return MetricCollection({"correct": SumMetric(), "count": SumMetric(), "nll": SumMetric()},
                                compute_groups=False)

    def compute_metrics(self, metric: nn.Module) -> dict[str, float]:
        v = metric.compute()
        n = float(v["count"])
        return {"acc": float(v["correct"]) / n if n else math.nan, "loss": float(v["nll"]) / n if n else math.nan}

    def _eval_step(self, stage: str, batch: dict[str, Tensor], dataloader_idx: int) -> Tensor:
        task = self.task_name(stage, dataloader_idx)
        if task not in self.label_ids:
            raise ConfigError(f"LabelWordLM: no label_ids for the {stage} task '{task}'")
        ids = torch.tensor(self.label_ids[task], device=batch["input_ids"].device)
        lp = answer_logprobs(self.model, batch["input_ids"], batch["attention_mask"])[:, ids]
        pred = lp.argmax(-1)
        correct = pred == batch["label"]
        true_lp = lp.gather(1, batch["label"][:, None])[:, 0]
        m = self._metric(stage, dataloader_idx)
        m["correct"].update(correct.double().sum())
        m["count"].update(torch.tensor(float(len(pred)), dtype=torch.float64))
        m["nll"].update(-true_lp.double().sum())
        self._pending.setdefault((stage, task), []).extend(
            zip(batch["idx"].tolist(), correct.tolist(), true_lp.tolist(), pred.tolist()))
        return -true_lp.mean()

    def _gather(self, stage: str) -> None:
        keys = [k for k in self._pending if k[0] == stage]
        local = {k: self._pending.pop(k) for k in keys}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, local)
        else:
            parts = [local]
        for part in parts:
            for k, rows in part.items():
                out = self.outcomes.setdefault(k, {})
                for idx, c, lp, p in rows:
                    out.setdefault(int(idx), (bool(c), float(lp), int(p)))

    def on_validation_epoch_start(self) -> None:
        for k in [k for k in self.outcomes if k[0] == "val"]:
            del self.outcomes[k]

    def on_test_epoch_start(self) -> None:
        for k in [k for k in self.outcomes if k[0] == "test"]:
            del self.outcomes[k]

    def on_validation_epoch_end(self) -> None:
        self._gather("val")
        super().on_validation_epoch_end()

    def on_test_epoch_end(self) -> None:
        self._gather("test")
        super().on_test_epoch_end()
