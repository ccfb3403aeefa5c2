"""Lightning data modules for merge runs: text-classification files per task, and synthetic tokens.

Both yield batches that Hugging Face models take directly: dicts of ``input_ids``,
``attention_mask`` and ``labels``. Validation and test have one dataloader per task, in the
order of the task list (``val_task_names`` / ``test_task_names``), which the task modules of
:mod:`lightning_merge.lightning.tasks` use to name their per-task metrics.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from ..errors import ConfigError

__all__ = ["IGNORE_INDEX", "SyntheticTokensDataModule", "TensorDictDataset", "TextClassificationDataModule",
           "read_rows", "synthetic_tokens", "task_band"]

#: the label of an unlabelled row (PyTorch's and Hugging Face's ignore index)
IGNORE_INDEX = -100


class TensorDictDataset(Dataset):
    """Rows of equally long tensors, returned as dicts (``{"input_ids": ..., "labels": ...}``)."""

    def __init__(self, **tensors: Tensor) -> None:
        lengths = {len(t) for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"TensorDictDataset: tensors of different lengths {sorted(lengths)}")
        self.tensors = tensors
        self.n = lengths.pop()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


class _ListDataset(Dataset):
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


def _check_tasks(arg: str, names: Sequence[str], allowed: Sequence[str]) -> list[str]:
    unknown = [t for t in names if t not in allowed]
    if unknown:
        raise ConfigError(f"{arg}: unknown task(s) {unknown}; the tasks are {list(allowed)}")
    return list(names)


# --------------------------------------------------------------------------------- synthetic

def _generator(seed: int, split: str, task: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{split}/{task}".encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


def synthetic_tokens(vocab_size: int, seq_len: int, n: int, *, task_index: int = 0, n_tasks: int = 1,
                     task: str = "task0", num_labels: int | None = None, seed: int = 0,
                     split: str = "train") -> dict[str, Tensor]:
    """The examples of one synthetic task (see :class:`SyntheticTokensDataModule` for the rules).

    Deterministic in (seed, split, task name); token 0 is never drawn (it is the pad token).
    """
    gen = _generator(seed, split, task)
    if num_labels is None:
        step = task_index + 1
        first = torch.randint(1, vocab_size, (n, 1), generator=gen)
        offsets = torch.arange(seq_len).unsqueeze(0) * step
        ids = 1 + (first - 1 + offsets) % (vocab_size - 1)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    lo, hi = task_band(vocab_size, task_index, n_tasks)
    ids = torch.randint(lo, hi, (n, seq_len), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, -1] % num_labels}


def task_band(vocab_size: int, task_index: int, n_tasks: int) -> tuple[int, int]:
    """Token ids [lo, hi) of task ``task_index`` of ``n_tasks`` in a classification setting: the ids
    ``1 .. vocab_size - 1`` cut into ``n_tasks`` consecutive, nearly equal slices."""
    usable = vocab_size - 1
    if n_tasks > usable:
        raise ConfigError(f"SyntheticTokensDataModule: {n_tasks} tasks need a vocabulary of at least "
                          f"{n_tasks + 1} ids, got vocab_size={vocab_size}")
    return 1 + usable * task_index // n_tasks, 1 + usable * (task_index + 1) // n_tasks


class SyntheticTokensDataModule(pl.LightningDataModule):
    """Deterministic random token sequences with learnable labels, for tests and smoke recipes.

    Token 0 is kept for padding (never drawn). Each task of ``tasks`` (default: one task named
    ``"synthetic"``) follows a fixed rule a small model learns in a few dozen steps:

    * classification (``num_labels`` set): the k-th task draws its tokens uniformly from its own
      slice of the vocabulary (ids ``1 .. vocab_size - 1`` cut into ``len(tasks)`` consecutive
      slices, :func:`task_band`) and ``label = input_ids[-1] % num_labels`` (the last token). An
      expert trained on one task leaves the other tasks' embedding rows untouched, and a single
      model can solve every task at once: a small multi-task merging benchmark;
    * causal language modelling (``num_labels=None``): arithmetic sequences over the whole
      vocabulary with step ``k + 1``, ``x[i+1] = 1 + (x[i] - 1 + k + 1) mod (vocab_size - 1)``;
      ``labels`` = ``input_ids``.

    Every (seed, split, task) has its own generator, so a task's examples do not depend on the
    other tasks or their order. Training uses ``n_train`` examples per task of ``train_tasks``
    (default: all tasks), concatenated and shuffled with a seeded generator; validation and test
    have one dataloader per task with ``n_val`` / ``n_test`` (default ``n_val``) examples.
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        n_train: int,
        n_val: int,
        num_labels: int | None = None,
        tasks: list[str] | None = None,
        batch_size: int = 16,
        seed: int = 0,
        *,
        n_test: int | None = None,
        train_tasks: list[str] | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if vocab_size < 2 or seq_len < 1 or n_train < 0 or n_val < 0 or (n_test is not None and n_test < 0):
            raise ConfigError(f"SyntheticTokensDataModule: need vocab_size >= 2, seq_len >= 1 and non-negative "
                              f"sizes (got vocab_size={vocab_size}, seq_len={seq_len}, n_train={n_train}, "
                              f"n_val={n_val}, n_test={n_test})")
        if num_labels is not None and num_labels < 2:
            raise ConfigError(f"SyntheticTokensDataModule: num_labels must be >= 2 (or None for language "
                              f"modelling), got {num_labels}")
        tasks = list(tasks) if tasks is not None else ["synthetic"]
        if not tasks or len(set(tasks)) != len(tasks):
            raise ConfigError(f"SyntheticTokensDataModule: tasks must be distinct names, got {tasks}")
        self.save_hyperparameters()
        self.vocab_size, self.seq_len, self.num_labels = vocab_size, seq_len, num_labels
        self.n_train, self.n_val = n_train, n_val
        self.n_test = n_val if n_test is None else n_test
        self.tasks = tasks
        if num_labels is not None:
            task_band(vocab_size, len(tasks) - 1, len(tasks))  # enough ids for every task
        self.train_tasks = _check_tasks("SyntheticTokensDataModule: train_tasks",
                                        tasks if train_tasks is None else train_tasks, tasks)
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    val_task_names = test_task_names = task_names

    def dataset(self, split: str, task: str) -> TensorDictDataset:
        """The examples of ``task`` in ``split`` (``"train"``, ``"val"`` or ``"test"``)."""
        n = {"train": self.n_train, "val": self.n_val, "test": self.n_test}[split]
        return TensorDictDataset(**synthetic_tokens(
            self.vocab_size, self.seq_len, n, task_index=self.tasks.index(task), n_tasks=len(self.tasks), task=task,
            num_labels=self.num_labels, seed=self.seed, split=split))

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, generator=gen,
                          num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(ConcatDataset([self.dataset("train", t) for t in self.train_tasks]), shuffle=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(self.dataset("val", t), shuffle=False) for t in self.tasks]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(self.dataset("test", t), shuffle=False) for t in self.tasks]

    def predict_dataloader(self) -> list[DataLoader]:
        return self.test_dataloader()


# ------------------------------------------------------------------------------------- files

def read_rows(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of a ``.csv`` / ``.tsv`` (header line) or ``.jsonl`` / ``.json`` file, as dicts."""
    p = Path(path)
    suffix = p.suffix.lower()
    rows: list[dict[str, Any]] = []
    if suffix in (".csv", ".tsv"):
        with p.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","):
                rows.append(row)
                if limit is not None and len(rows) >= limit:
                    break
    elif suffix in (".jsonl", ".json"):
        with p.open(encoding="utf-8") as fh:
            text = fh.read()
        if suffix == ".json" and text.lstrip().startswith("["):
            rows = list(json.loads(text))
        else:
            for k, line in enumerate(text.splitlines()):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"{p}: line {k + 1} is not JSON ({e.msg})") from None
        rows = rows[:limit] if limit is not None else rows
    else:
        raise ConfigError(f"{p}: unsupported file type '{suffix}'; use .csv, .tsv, .jsonl or .json")
    return rows


class TextClassificationDataModule(pl.LightningDataModule):
    """Text classification from CSV / TSV / JSONL files, one file per task and split.

    Args:
        tokenizer: a Hugging Face tokenizer folder (``AutoTokenizer.from_pretrained``).
        train_files, val_files, test_files: ``{task: path}``; validation and test have one
            dataloader per task, in the dict's order.
        text_column, label_column: column (key) names in the files. ``label_column=None``: unlabelled
            files (batches carry ``labels`` = -100, the ignore index), for objectives that use no labels
            (LearnedMerge's ``entropy``, calibration passes).
        max_length: truncation length in tokens; batches are padded to their longest row.
        batch_size, num_workers: of every dataloader.
        limit: read at most this many rows of each file (quick runs).
        train_task: train on this task only; default: the concatenation of all ``train_files``.

    Labels that are all integers are used as they are; otherwise each task's labels are the
    sorted distinct values over its files (``label_names[task]``), mapped to 0, 1, ...
    Batches are dicts of ``input_ids``, ``attention_mask``, ``labels`` and ``task`` (the row's index
    into :attr:`task_names`). Validation and test rows are ordered by length (less padding).
    """

    def __init__(
        self,
        tokenizer: str,
        train_files: dict[str, str] | None = None,
        val_files: dict[str, str] | None = None,
        test_files: dict[str, str] | None = None,
        text_column: str = "text",
        label_column: str | None = "label",
        max_length: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        limit: int | None = None,
        train_task: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.files: dict[str, dict[str, str]] = {}
        for split, files in (("train", train_files), ("val", val_files), ("test", test_files)):
            files = dict(files or {})
            for task, path in files.items():
                if not Path(path).is_file():
                    raise ConfigError(f"TextClassificationDataModule: {split}_files['{task}'] = '{path}': "
                                      "no such file")
            self.files[split] = files
        if train_task is not None and train_task not in self.files["train"]:
            raise ConfigError(f"TextClassificationDataModule: train_task '{train_task}' is not one of "
                              f"train_files {list(self.files['train'])}")
        if max_length < 1 or (limit is not None and limit < 1):
            raise ConfigError(f"TextClassificationDataModule: max_length ({max_length}) and limit ({limit}) "
                              "must be positive")
        self.tokenizer_path = tokenizer
        self.text_column, self.label_column = text_column, label_column
        self.max_length, self.batch_size, self.num_workers, self.limit = max_length, batch_size, num_workers, limit
        self.train_task = train_task
        self.tokenizer: Any = None
        self.label_names: dict[str, list[str] | None] = {}
        #: classes per task (label names, or the largest integer label + 1), after ``setup``
        self.num_labels_per_task: dict[str, int] = {}
        self._data: dict[str, dict[str, Dataset]] = {}

    @property
    def task_names(self) -> list[str]:
        """Every task of every split, in order of first appearance: the index batches carry as ``task``."""
        return list(dict.fromkeys(t for split in self.files.values() for t in split))

    @property
    def val_task_names(self) -> list[str]:
        return list(self.files["val"])

    @property
    def test_task_names(self) -> list[str]:
        return list(self.files["test"])

    @property
    def num_labels(self) -> int:
        """The largest number of classes over the tasks (known after ``setup``; 0 before)."""
        return max(self.num_labels_per_task.values(), default=0)

    def _raw(self, split: str, task: str) -> list[dict[str, Any]]:
        path = self.files[split][task]
        rows = read_rows(path, self.limit)
        for i, row in enumerate(rows):
            missing = [c for c in (self.text_column, self.label_column) if c is not None and c not in row]
            if missing:
                raise ConfigError(f"{path}: row {i + 1} has no column(s) {missing} (it has {sorted(row)}); set "
                                  "text_column / label_column (label_column: null for unlabelled data)")
        return rows

    def _label_map(self, task: str, raw: Mapping[str, list[dict[str, Any]]]) -> dict[Any, int] | None:
        values = {str(r[self.label_column]).strip() for rows in raw.values() for r in rows}
        try:
            ints = {v: int(v) for v in values}
        except ValueError:
            names = sorted(values)
            self.label_names[task] = names
            return {v: i for i, v in enumerate(names)}
        bad = [v for v, i in ints.items() if i < 0]
        if bad:
            raise ConfigError(f"TextClassificationDataModule: task '{task}' has negative labels {bad[:3]}")
        self.label_names[task] = None
        return None

    def setup(self, stage: str | None = None) -> None:
        if self._data:
            return
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ConfigError(f"tokenizer {self.tokenizer_path} has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        for task_index, task in enumerate(self.task_names):
            raw = {split: self._raw(split, task) for split in self.files if task in self.files[split]}
            labelled = self.label_column is not None
            mapping = self._label_map(task, raw) if labelled else None
            if not labelled:
                self.label_names[task] = None
            for split, rows in raw.items():
                texts = [str(r[self.text_column]) for r in rows]
                enc = self.tokenizer(texts, truncation=True, max_length=self.max_length)
                if labelled:
                    labels = [str(r[self.label_column]).strip() for r in rows]
                    labels = [mapping[v] if mapping is not None else int(v) for v in labels]
                else:
                    labels = [IGNORE_INDEX] * len(rows)
                self.num_labels_per_task[task] = max([self.num_labels_per_task.get(task, 0)]
                                                     + [y + 1 for y in labels if y >= 0])
                rows = [{"input_ids": ids, "attention_mask": am, "labels": y, "task": task_index}
                        for ids, am, y in zip(enc["input_ids"], enc["attention_mask"], labels)]
                if split != "train":  # evaluation order does not matter: group similar lengths, pad less
                    rows.sort(key=lambda r: len(r["input_ids"]))
                self._data.setdefault(split, {})[task] = _ListDataset(rows)

    def _collate(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        batch = self.tokenizer.pad([{k: r[k] for k in ("input_ids", "attention_mask")} for r in rows],
                                   return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "labels": torch.tensor([r["labels"] for r in rows], dtype=torch.long),
                "task": torch.tensor([r["task"] for r in rows], dtype=torch.long)}

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          collate_fn=self._collate)

    def _split(self, split: str) -> dict[str, Dataset]:
        if not self.files[split]:
            raise ConfigError(f"TextClassificationDataModule: no {split}_files given")
        return self._data[split]

    def train_dataloader(self) -> DataLoader:
        data = self._split("train")
        tasks = [self.train_task] if self.train_task is not None else list(data)
        return self._loader(ConcatDataset([data[t] for t in tasks]), shuffle=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(ds, shuffle=False) for ds in self._split("val").values()]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(ds, shuffle=False) for ds in self._split("test").values()]
