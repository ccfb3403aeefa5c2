"""Instruction prompts with one-word answers, their data module, and a causal LM scored by label-word likelihood.

Prompts. Every example is ``prefix + text + suffix`` (token ids concatenated, the text truncated so
the whole prompt has at most ``max_length`` tokens) and its answer is a label word, e.g.

    Review: <snippet>
    Is this review positive or negative? Answer:            -> " positive" | " negative"

The four tasks are :mod:`lightning_merge.examples.corpora`'s (sentiment, subjectivity, BBC topic from
the headline, WordNet supersense from the gloss). :data:`PROMPTS` maps each task to its prefix and
suffix, :data:`LABEL_WORDS` each corpus label name to its answer word (with its leading space).
A batch holds ``input_ids`` / ``attention_mask`` (right padding), ``target`` (the token id of the
answer's first token), ``label`` (the class index), ``idx`` (the example's row in its JSONL file)
and ``task`` (the task's index). Evaluation sets are ordered by length (longest first) so batches
carry little padding; ``idx`` restores the file order.

Scoring (:func:`answer_logprobs`, :class:`LabelWordLM`). For a prompt x (right-padded in its batch)
the model's next-token distribution at the last real position, log p(· | x) = log_softmax(W h_last),
is computed once; the class score of label word w_c is log p(first token of w_c | x) and the
prediction is argmax_c. One forward per example scores every class. When every label word is a
single token (true for these words on SmolLM2's tokenizer; :func:`label_token_ids` tells), this *is*
the full label-word log-likelihood log p(w_c | x). Padding on the right does not change a causal
model's hidden state at a real position, so a prompt scores the same alone or in any batch (up to
float rounding).

Training (``trainer.fit``) minimises −log p(answer token | x), the same next-token cross-entropy as
:class:`~lightning_merge.lightning.tasks.CausalLM` with every prompt position's label set to −100
and only the answer token's kept, computed at the one position that is not ignored.

Both classes take plain arguments (folders, task names, sizes), so a LightningCLI YAML builds them
(``recipes/llm_lora.yaml``); :mod:`lightning_merge.examples.smollm2` writes their inputs.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_merge.errors import ConfigError
from lightning_merge.lightning.tasks import CausalLM, DType, Finetune

__all__ = ["LABEL_WORDS", "PROMPTS", "LabelWordLM", "PromptDataModule", "PromptSet", "answer_logprobs", "collate",
           "encode", "label_token_ids", "label_words"]

#: (prefix, suffix) of each task's prompt; the text goes between them, after a space
PROMPTS: dict[str, tuple[str, str]] = {
    "sentiment": ("Review:", "\nIs this review positive or negative? Answer:"),
    "subjectivity": ("Sentence:", "\nIs this a plot fact or an opinion? Answer:"),
    "topic": ("Headline:", "\nTopic (business, entertainment, politics, sport or tech):"),
    "supersense": ("Definition:", "\nCategory (animal, artifact, body, food, location, person, plant or substance):"),
}
#: the answer word of each label name of the corpora
LABEL_WORDS: dict[str, str] = {
    "rotten": " negative", "fresh": " positive", "objective": " fact", "subjective": " opinion",
    "business": " business", "entertainment": " entertainment", "politics": " politics",
    "sport": " sport", "sports": " sport",
    "tech": " tech", **{n: f" {n}" for n in ("animal", "artifact", "body", "food", "location", "person", "plant",
                                             "substance")},
}
_HERE = "lightning_merge/examples/label_words.py"


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def label_words(labels_json: str | Path) -> list[str]:
    """The answer words of a task, in class order, from the ``labels.json`` :func:`corpora.prepare` wrote."""
    names = json.loads(Path(labels_json).read_text())
    missing = [n for n in names if n not in LABEL_WORDS]
    if missing:
        raise ConfigError(f"{labels_json}: label names {missing} have no answer word in LABEL_WORDS ({_HERE})")
    return [LABEL_WORDS[n] for n in names]


def label_token_ids(tokenizer: Any, words: Sequence[str]) -> tuple[list[int], bool]:
    """(first token id of each answer word, whether every word is a single token).

    The first tokens must differ, else two classes would get the same score."""
    toks = [encode(tokenizer, w) for w in words]
    if any(not t for t in toks):
        raise ConfigError(f"label words {list(words)}: some tokenize to nothing")
    first = [t[0] for t in toks]
    if len(set(first)) != len(first):
        raise ConfigError(f"label words {list(words)} share a first token ({first}); pick words that differ")
    return first, all(len(t) == 1 for t in toks)


class PromptSet(Dataset):
    """The encoded prompts of one task's split: dicts of ``input_ids`` (list), ``target``, ``label``,
    ``idx``, ``task``; ordered by length (longest first) when ``by_length``."""

    def __init__(self, tokenizer: Any, path: str | Path, task: str, task_index: int, targets: Sequence[int], *,
                 max_length: int, by_length: bool) -> None:
        if task not in PROMPTS:
            raise ConfigError(f"task '{task}' has no prompt in PROMPTS ({_HERE}); known: {sorted(PROMPTS)}")
        prefix, suffix = (encode(tokenizer, s) for s in PROMPTS[task])
        budget = max_length - len(prefix) - len(suffix)
        if budget < 4:
            raise ConfigError(f"max_length {max_length} leaves {budget} tokens for the text of task '{task}'; "
                              f"raise it above {len(prefix) + len(suffix) + 4}")
        rows = []
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if not line.strip():
                    continue
                r = json.loads(line)
                ids = prefix + encode(tokenizer, " " + r["text"])[:budget] + suffix
                rows.append({"input_ids": ids, "target": targets[int(r["label"])], "label": int(r["label"]),
                             "idx": i, "task": task_index})
        if by_length:
            rows.sort(key=lambda r: (-len(r["input_ids"]), r["idx"]))
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


def collate(rows: list[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` and the per-example integers."""
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, :len(r["input_ids"])] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    for k in ("target", "label", "idx", "task"):
        out[k] = torch.tensor([r[k] for r in rows], dtype=torch.long)
    return out


class PromptDataModule(pl.LightningDataModule):
    """Training prompts of ``train_tasks`` (shuffled together, ``seed``), evaluation prompts of
    ``eval_tasks`` (one dataloader per task, in order, split ``eval_split``; validation and test).

    Args:
        tokenizer_dir: the model folder whose tokenizer encodes the prompts.
        files: ``{task: {split: JSONL path}}``; or ``data_dir``: a folder of ``<task>/<split>.jsonl``
            and ``<task>/labels.json`` (what :func:`corpora.prepare` and
            ``python -m lightning_merge.examples.smollm2 OUT`` write, under ``OUT/data``).
        targets: ``{task: answer token id of each class}`` (:func:`label_token_ids`); default: from
            each task's ``labels.json`` (:data:`LABEL_WORDS`) and the tokenizer. :class:`LabelWordLM`
            without ``label_ids`` reads them from here.
        eval_tasks: default: ``train_tasks``, else every task of ``files``.
        max_length: prompt length in tokens (the text is truncated to fit).
    """

    def __init__(self, tokenizer_dir: str, files: dict[str, dict[str, str]] | None = None,
                 targets: dict[str, list[int]] | None = None, *, data_dir: str | None = None,
                 eval_tasks: list[str] | None = None, train_tasks: list[str] | None = None,
                 eval_split: str = "test", max_length: int = 48, batch_size: int = 8, eval_batch_size: int = 16,
                 seed: int = 0) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        train_tasks = list(train_tasks or ())
        if (files is None) == (data_dir is None):
            raise ConfigError("PromptDataModule: give exactly one of files={task: {split: path}} or data_dir")
        names = list(eval_tasks) if eval_tasks is not None else train_tasks or list(files or {})
        if not names:
            raise ConfigError("PromptDataModule: no task; set eval_tasks (and train_tasks to train)")
        if files is None:
            files = {t: {s: str(Path(data_dir) / t / f"{s}.jsonl") for s in ("train", "val", "test")}
                     for t in dict.fromkeys(names + train_tasks)}
        need = [(t, eval_split) for t in names] + [(t, "train") for t in train_tasks]
        for t, s in need:
            path = files.get(t, {}).get(s)
            if path is None or not Path(path).is_file():
                raise ConfigError(f"PromptDataModule: the {s} split of task '{t}' ({path}) does not exist; "
                                  "write the data with `python -m lightning_merge.examples.smollm2 OUT` "
                                  "(data_dir: OUT/data) or fix files/data_dir")
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        if targets is None:
            targets = {t: label_token_ids(self.tokenizer, label_words(Path(files[t][s]).with_name("labels.json")))[0]
                       for t, s in dict(need).items()}
        missing = [t for t, _ in need if t not in targets]
        if missing:
            raise ConfigError(f"PromptDataModule: targets has no answer token ids for task(s) {missing}")
        self.files, self.targets = files, targets
        self.task_names = names
        self.train_tasks, self.eval_split = train_tasks, eval_split
        self.max_length, self.batch_size = max_length, batch_size
        self.eval_batch_size, self.seed = eval_batch_size, seed
        self._train: Dataset | None = None
        self._eval: list[PromptSet] | None = None

    def _set(self, task: str, split: str, by_length: bool) -> PromptSet:
        index = self.task_names.index(task) if task in self.task_names else -1
        return PromptSet(self.tokenizer, self.files[task][split], task, index, self.targets[task],
                         max_length=self.max_length, by_length=by_length)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.train_tasks and self._train is None:
            rows = [r for t in self.train_tasks for r in self._set(t, "train", False).rows]
            random.Random(self.seed).shuffle(rows)
            self._train = _Rows(rows)
        if self._eval is None:
            self._eval = [self._set(t, self.eval_split, True) for t in self.task_names]

    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=lambda b: collate(b, self.pad_id))

    def train_dataloader(self) -> DataLoader:
        if self._train is None:
            raise ConfigError("PromptDataModule: no train_tasks were given")
        return self._loader(self._train, self.batch_size, True)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(ds, self.eval_batch_size, False) for ds in self._eval or []]

    test_dataloader = val_dataloader


class _Rows(Dataset):
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


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
        label_ids: ``{task: [answer token id of class 0, 1, ...]}``; None: the data module's
            ``targets`` (:class:`PromptDataModule`), read in ``setup``.
        train_layers: with ``finetune="full"``, only these decoder blocks (``model.layers.<i>``) and
            the final norm train; the tied embeddings stay frozen. None: :class:`CausalLM`'s rule.
        lr, weight_decay, finetune, lora_r, lora_alpha, lora_dropout, lora_targets, task_names, dtype:
            :class:`CausalLM`'s.

    Logs ``<stage>/<task>/acc`` and ``<stage>/<task>/loss`` (mean −log p(true label word | x)), and
    their means ``<stage>/acc_mean`` / ``<stage>/loss_mean``. After each evaluation epoch
    :attr:`outcomes` holds ``{(stage, task): {idx: (correct, log p(true word), predicted class)}}``
    gathered from every rank (duplicates the distributed sampler pads with collapse on ``idx``).
    """

    def __init__(self, model: str, label_ids: dict[str, list[int]] | None = None, *,
                 train_layers: list[int] | None = None, lr: float = 1e-4, weight_decay: float = 0.0,
                 finetune: Finetune = "full", lora_r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                 lora_targets: list[str] | None = None, task_names: list[str] | None = None,
                 dtype: DType = "float32") -> None:
        super().__init__(model, lr=lr, weight_decay=weight_decay, finetune=finetune, lora_r=lora_r,
                         lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_targets=lora_targets,
                         task_names=task_names, dtype=dtype)
        self.label_ids = None if label_ids is None else self._checked(label_ids)
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

    @staticmethod
    def _checked(label_ids: Any) -> dict[str, list[int]]:
        if not label_ids or any(len(v) < 2 for v in label_ids.values()):
            raise ConfigError(f"LabelWordLM: label_ids needs >= 2 answer tokens per task, got {dict(label_ids)}")
        return {t: [int(i) for i in v] for t, v in label_ids.items()}

    def setup(self, stage: str) -> None:
        if self.label_ids is None:
            targets = getattr(getattr(self.trainer, "datamodule", None), "targets", None)
            if not targets:
                raise ConfigError("LabelWordLM: no label_ids and the data module has no `targets`; pass "
                                  "label_ids={task: [answer token id per class]} or use PromptDataModule")
            self.label_ids = self._checked(targets)

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
        if task not in (self.label_ids or {}):
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
