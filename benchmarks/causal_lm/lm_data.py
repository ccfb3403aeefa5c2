"""Instruction-style prompts with one-word answers for the causal-LM benchmark, and their data module.

Every example is ``prefix + text + suffix`` (token ids concatenated, the text truncated so the whole
prompt has at most ``max_length`` tokens) and its answer is a label word, e.g.

    Review: <snippet>
    Is this review positive or negative? Answer:            -> " positive" | " negative"

The four tasks are :mod:`lightning_merge.examples.corpora`'s (sentiment, subjectivity, BBC topic from
the headline, WordNet supersense from the gloss). :data:`PROMPTS` maps each task to its prefix and
suffix, :data:`LABEL_WORDS` each corpus label name to its answer word (with its leading space).
A batch holds ``input_ids`` / ``attention_mask`` (right padding), ``target`` (the token id of the
answer's first token), ``label`` (the class index), ``idx`` (the example's row in its JSONL file)
and ``task`` (the task's index). Evaluation sets are ordered by length (longest first) so batches
carry little padding; ``idx`` restores the file order.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_merge.errors import ConfigError

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


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def label_words(labels_json: str | Path) -> list[str]:
    """The answer words of a task, in class order, from the ``labels.json`` :func:`corpora.prepare` wrote."""
    names = json.loads(Path(labels_json).read_text())
    missing = [n for n in names if n not in LABEL_WORDS]
    if missing:
        raise ConfigError(f"{labels_json}: label names {missing} have no answer word in LABEL_WORDS (lm_data.py)")
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
            raise ConfigError(f"task '{task}' has no prompt in PROMPTS (lm_data.py); known: {sorted(PROMPTS)}")
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
    """Training prompts of ``train_tasks`` (shuffled together), evaluation prompts of ``eval_tasks``
    (one dataloader per task, in order) from ``files[task][split]``.

    ``targets[task]``: the answer token id of each class (:func:`label_token_ids`).
    """

    def __init__(self, tokenizer_dir: str, files: Mapping[str, Mapping[str, str]],
                 targets: Mapping[str, Sequence[int]], *, eval_tasks: Sequence[str],
                 train_tasks: Sequence[str] = (), eval_split: str = "test", max_length: int = 48,
                 batch_size: int = 8, eval_batch_size: int = 16, seed: int = 0) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self.files, self.targets = files, targets
        self.task_names = list(eval_tasks)
        self.train_tasks, self.eval_split = list(train_tasks), eval_split
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
