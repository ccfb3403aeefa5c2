"""The cached building blocks of the causal-LM benchmark: the base folder, the results store, experts, scoring.

Everything a stage makes is cached under the work directory (``benchmarks/_data/causal_lm/<mode>/``):
the base folder, the data splits, every expert (PEFT LoRA adapter folders; upper-block full
fine-tunes as ``.safetensors`` files holding only the trained tensors), every exported adapter, and
``results.json`` (one row per evaluation, with per-example correctness bits). A rerun skips what exists.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from lightning_merge.examples.label_words import LabelWordLM, PromptDataModule, label_token_ids, label_words

log = logging.getLogger("causal_lm")


def pack(bits: Sequence[bool]) -> str:
    return base64.b64encode(np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes()).decode()


def unpack(s: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(s), dtype=np.uint8))[:n].astype(bool)


class Store:
    """``results.json``: ``meta``, ``timings`` (seconds per step that ran) and ``rows``; rewritten atomically."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        data = json.loads(path.read_text()) if path.is_file() else None
        if data is not None and data.get("meta") != meta:
            log.warning("%s was made with other settings; starting it again", path)
            data = None
        self.data = data or {"meta": meta, "timings": {}, "rows": []}
        self.rows = {r["key"]: r for r in self.data["rows"]}

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=0))
        os.replace(tmp, self.path)

    def add(self, row: dict[str, Any]) -> None:
        self.data["rows"].append(row)
        self.rows[row["key"]] = row
        self.save()

    def timing(self, name: str, seconds: float) -> None:
        self.data["timings"][name] = round(seconds, 1)
        self.save()


def key(kind: str, regime: str, name: str, params: dict[str, Any], seed: int, split: str) -> str:
    return json.dumps([kind, regime, name, params, seed, split], sort_keys=True)


@dataclass
class Ctx:
    """One mode's inputs: base folder, data files, label words / answer ids per task, settings, store."""

    mode: str
    work: Path
    base: str
    files: dict[str, dict[str, str]]
    cfg: dict[str, Any]
    store: Store
    tasks: list[str] = field(default_factory=list)
    targets: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def open(cls, mode: str, work: Path, base: str, files: dict[str, dict[str, str]], cfg: dict[str, Any]) -> Ctx:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(base)
        tasks = list(files)
        words = {t: label_words(Path(files[t]["test"]).with_name("labels.json")) for t in tasks}
        ids, single = {}, {}
        for t in tasks:
            ids[t], single[t] = label_token_ids(tok, words[t])
        sizes = {t: {s: sum(1 for ln in open(p, encoding="utf-8") if ln.strip()) for s, p in files[t].items()}
                 for t in tasks}
        meta = {"mode": mode, "tasks": tasks, "sizes": sizes, "label_words": words, "label_ids": ids,
                "single_token_labels": single, "cfg": cfg}
        return cls(mode, work, base, files, cfg, Store(work / "results.json", meta), tasks, ids)

    def module(self, model: str | None = None, **kwargs: Any) -> LabelWordLM:
        return LabelWordLM(model or self.base, self.targets, task_names=self.tasks, **kwargs)

    def datamodule(self, *, split: str = "test", train_tasks: Sequence[str] = (),
                   eval_tasks: Sequence[str] | None = None) -> PromptDataModule:
        c = self.cfg
        return PromptDataModule(self.base, self.files, self.targets, eval_tasks=list(eval_tasks or self.tasks),
                                train_tasks=train_tasks, eval_split=split, max_length=c["max_length"],
                                batch_size=c["batch"], eval_batch_size=c["eval_batch"])


def trainer(**kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                    enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def outcomes_of(module: LabelWordLM, stage: str, tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per task: accuracy, n, packed correctness bits in file order, summed −log p(true word)."""
    out = {}
    for t in tasks:
        rows = module.outcomes[(stage, t)]
        order = sorted(rows)
        bits = [rows[i][0] for i in order]
        out[t] = {"acc": sum(bits) / len(bits), "n": len(bits), "bits": pack(bits),
                  "nll": -sum(rows[i][1] for i in order)}
    return out


def evaluate(ctx: Ctx, *, model: str | None = None, callbacks: Sequence[pl.Callback] = (), split: str = "test",
             **trainer_kwargs: Any) -> dict[str, dict[str, Any]]:
    """``trainer.test`` of the base (or ``model``) after ``callbacks`` acted, on ``split`` of every task."""
    torch.manual_seed(0)
    module = ctx.module(model)
    trainer(callbacks=list(callbacks), **trainer_kwargs).test(module, datamodule=ctx.datamodule(split=split),
                                                              verbose=False)
    return outcomes_of(module, "test", ctx.tasks)


def scored(ctx: Ctx, *, kind: str, regime: str, name: str, params: dict[str, Any], seed: int = 0,
           split: str = "test", extra: dict[str, Any] | None = None, **eval_kwargs: Any) -> dict[str, Any]:
    """The cached row of one evaluation, evaluated now if missing."""
    k = key(kind, regime, name, params, seed, split)
    if k in ctx.store.rows:
        return ctx.store.rows[k]
    t0 = time.perf_counter()
    res = evaluate(ctx, split=split, **eval_kwargs)
    row = {"key": k, "kind": kind, "regime": regime, "name": name, "params": params, "seed": seed, "split": split,
           **(extra or {}), "acc": {t: r["acc"] for t, r in res.items()}, "n": {t: r["n"] for t, r in res.items()},
           "nll": {t: round(r["nll"], 4) for t, r in res.items()}, "bits": {t: r["bits"] for t, r in res.items()},
           "seconds": round(time.perf_counter() - t0, 1)}
    ctx.store.add(row)
    log.info("%-6s %-6s %-20s %-55s: %s (%.0f s)", kind, regime, extra.get("family", name) if extra else name,
             json.dumps(params)[:55], "  ".join(f"{t[:4]} {100 * r['acc']:.1f}" for t, r in res.items()),
             row["seconds"])
    return row


def lora_expert(ctx: Ctx, task: str) -> str:
    """PEFT LoRA r 8 on ``q_proj``/``v_proj`` trained on ``task`` (``trainer.fit``); the adapter folder."""
    out = ctx.work / "experts" / "lora" / task
    if (out / "adapter_config.json").is_file():
        return str(out)
    c = ctx.cfg
    t0 = time.perf_counter()
    pl.seed_everything(0, workers=True, verbose=False)
    module = ctx.module(finetune="lora", lr=c["lora_lr"], lora_r=8, lora_alpha=16, lora_targets=["q_proj", "v_proj"])
    trainer(max_steps=c["lora_steps"], limit_val_batches=0).fit(
        module, datamodule=ctx.datamodule(train_tasks=[task], eval_tasks=[task]))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    module.model.save_pretrained(tmp)
    os.replace(tmp, out)
    ctx.store.timing(f"train lora {task} ({c['lora_steps']} steps)", time.perf_counter() - t0)
    log.info("lora expert %s trained (%.0f s)", task, time.perf_counter() - t0)
    return str(out)


def full_expert(ctx: Ctx, task: str) -> str:
    """Full fine-tune of the upper blocks ``cfg["full_layers"]`` (and the final norm) on ``task``; a
    ``.safetensors`` file of the trained tensors (the other tensors equal the base's)."""
    from safetensors.torch import save_file

    out = ctx.work / "experts" / "full" / f"{task}.safetensors"
    if out.is_file():
        return str(out)
    c = ctx.cfg
    t0 = time.perf_counter()
    pl.seed_everything(0, workers=True, verbose=False)
    module = ctx.module(finetune="full", lr=c["full_lr"], train_layers=c["full_layers"])
    trainer(max_steps=c["full_steps"], limit_val_batches=0).fit(
        module, datamodule=ctx.datamodule(train_tasks=[task], eval_tasks=[task]))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(module.trained_state(), str(tmp))
    os.replace(tmp, out)
    ctx.store.timing(f"train full {task} ({c['full_steps']} steps)", time.perf_counter() - t0)
    log.info("full expert %s trained (%.0f s)", task, time.perf_counter() - t0)
    return str(out)
