"""The task wrappers and data modules of ``lightning_merge.lightning``: synthetic and file data,
per-task metrics with their means and normalized scores, head / LoRA fine-tuning after a merge."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_merge import ConfigError, Ties, merge_models
from lightning_merge.examples.make_recipe_models import build_tokenizer, save_tiny_model
from lightning_merge.lightning import MergeCallback
from lightning_merge.lightning.data import (
    SyntheticTokensDataModule,
    TextClassificationDataModule,
    synthetic_tokens,
    task_band,
)
from lightning_merge.lightning.tasks import CausalLM, SequenceClassifier

V, L, LABELS = 64, 8, 3


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """clf/ (tiny Llama classifier + tokenizer), e0/, e1/ (perturbed copies), lm/ (tiny causal LM)."""
    root = tmp_path_factory.mktemp("task_models")
    base = save_tiny_model(root / "clf", "classifier", seed=0, vocab_size=V, num_labels=LABELS, hidden_size=32)
    gen = torch.Generator().manual_seed(1)
    for i in range(2):
        state = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.state_dict().items()}
        base.save_pretrained(root / f"e{i}", state_dict=state)
    save_tiny_model(root / "lm", "causal_lm", seed=0, vocab_size=V, hidden_size=32)
    return {k: str(root / k) for k in ("clf", "e0", "e1", "lm")}


def run(tmp_path: Path, fn: str, module, datamodule, callbacks=(), **kw):
    args = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                default_root_dir=str(tmp_path))
    args.update(kw)
    trainer = pl.Trainer(callbacks=list(callbacks), **args)
    getattr(trainer, fn)(module, datamodule=datamodule)
    return trainer


def synthetic(**kw) -> SyntheticTokensDataModule:
    args = dict(vocab_size=V, seq_len=L, n_train=32, n_val=24, num_labels=LABELS, tasks=["a", "b"], batch_size=8)
    args.update(kw)
    return SyntheticTokensDataModule(**args)


def metrics(trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@torch.no_grad()
def accuracy(model, dm: SyntheticTokensDataModule, task: str, split: str = "val") -> float:
    ds = dm.dataset(split, task).tensors
    logits = model(input_ids=ds["input_ids"], attention_mask=ds["attention_mask"]).logits
    return float((logits.argmax(-1) == ds["labels"]).float().mean())


# ----------------------------------------------------------------------------------------- data

def test_synthetic_rules_and_determinism():
    dm = synthetic(tasks=["a", "b", "c"], n_test=16)
    for k, task in enumerate(dm.tasks):
        ds = dm.dataset("val", task).tensors
        lo, hi = task_band(V, k, 3)
        assert ds["input_ids"].min() >= lo and ds["input_ids"].max() < hi  # each task its own slice
        assert torch.equal(ds["labels"], ds["input_ids"][:, -1] % LABELS)
        assert torch.equal(ds["attention_mask"], torch.ones_like(ds["input_ids"]))
    # a task's data depends on (seed, split, task name) only
    again = synthetic(tasks=["a", "b", "c"], n_test=16)
    assert torch.equal(dm.dataset("val", "b").tensors["input_ids"], again.dataset("val", "b").tensors["input_ids"])
    assert not torch.equal(dm.dataset("val", "a").tensors["input_ids"][:16],
                           dm.dataset("test", "a").tensors["input_ids"])
    assert not torch.equal(dm.dataset("val", "a").tensors["input_ids"],
                           synthetic(seed=1).dataset("val", "a").tensors["input_ids"])
    assert len(dm.val_dataloader()) == 3 and len(dm.test_dataloader()[0].dataset) == 16
    assert dm.val_task_names == dm.test_task_names == ["a", "b", "c"]
    one = synthetic(train_tasks=["b"])
    assert len(one.train_dataloader().dataset) == 32
    first = [b["input_ids"] for b in dm.train_dataloader()]
    assert all(torch.equal(x, y) for x, y in zip(first, [b["input_ids"] for b in again.train_dataloader()]))
    # causal LM: arithmetic sequences with step k + 1
    lm = synthetic_tokens(V, L, 4, task_index=1, num_labels=None)
    ids = lm["input_ids"]
    assert torch.equal(lm["labels"], ids) and ids.min() >= 1
    assert torch.equal((ids[:, 1:] - 1) % (V - 1), (ids[:, :-1] - 1 + 2) % (V - 1))
    with pytest.raises(ConfigError, match="train_tasks"):
        synthetic(train_tasks=["z"])
    with pytest.raises(ConfigError, match="num_labels"):
        synthetic(num_labels=1)


def test_text_classification_files(tmp_path, models):
    a_train, a_val, b_val = tmp_path / "a_train.csv", tmp_path / "a_val.csv", tmp_path / "b_val.jsonl"
    a_train.write_text("text,label\nw2 w3 w4,pos\nw5,neg\nw6 w7,pos\n")
    a_val.write_text("text,label\nw2 w9,neg\nw3,pos\n")
    b_val.write_text("\n".join(json.dumps({"sentence": f"w{i} w{i + 1}", "y": i % 3}) for i in range(2, 9)) + "\n")
    dm = TextClassificationDataModule(models["clf"], train_files={"a": str(a_train)},
                                      val_files={"a": str(a_val), "b": str(b_val)}, batch_size=4)
    with pytest.raises(ConfigError, match=r"row 1 has no column\(s\) \['text', 'label'\]"):
        dm.setup("fit")
    dm = TextClassificationDataModule(models["clf"], train_files={"a": str(a_train)},
                                      val_files={"a": str(a_val)}, batch_size=2, limit=2)
    dm.setup("fit")
    assert dm.label_names == {"a": ["neg", "pos"]} and dm.num_labels == 2
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "task"}
    assert batch["task"].tolist() == [0, 0]  # the index of task "a" in dm.task_names
    assert len(dm.train_dataloader().dataset) == 2  # limit
    val = next(iter(dm.val_dataloader()[0]))
    # evaluation rows ordered by length, padded to the batch's longest row with [PAD] = 0
    assert val["input_ids"].tolist() == [[3, 0], [2, 9]]
    assert val["attention_mask"].tolist() == [[1, 0], [1, 1]]
    assert val["labels"].tolist() == [1, 0]
    dm = TextClassificationDataModule(models["clf"], val_files={"b": str(b_val), "a": str(a_val)},
                                      text_column="sentence", label_column="y")
    assert dm.val_task_names == ["b", "a"]
    with pytest.raises(ConfigError, match="no such file"):
        TextClassificationDataModule(models["clf"], val_files={"a": str(tmp_path / "missing.csv")})
    # unlabelled files (label_column=None): rows need only their text; labels are the ignore index
    raw = tmp_path / "raw.jsonl"
    raw.write_text("\n".join(json.dumps({"text": f"w{i} w{i + 2}"}) for i in range(5)) + "\n")
    dm = TextClassificationDataModule(models["clf"], train_files={"u": str(raw)}, label_column=None, batch_size=5)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].tolist() == [-100] * 5 and batch["input_ids"].shape[0] == 5
    assert dm.label_names == {"u": None} and dm.num_labels == 0
    with pytest.raises(ConfigError, match=r"no column\(s\) \['label'\].*label_column: null"):
        TextClassificationDataModule(models["clf"], train_files={"u": str(raw)}).setup("fit")
    with pytest.raises(ConfigError, match="train_task"):
        TextClassificationDataModule(models["clf"], train_files={"a": str(a_train)}, train_task="b")


def test_tokenizer_roundtrip(tmp_path):
    tok = build_tokenizer(16)
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("w3 w15 zzz")["input_ids"] == [3, 15, 1] and again.pad_token_id == 0


# ------------------------------------------------------------------------------------ classifier

def test_multitask_validation_and_normalized_scores(tmp_path, models):
    dm = synthetic()
    module = SequenceClassifier(models["clf"], LABELS, expert_scores={"a": 0.5, "b": 0.8})
    trainer = run(tmp_path, "validate", module, dm)
    m = metrics(trainer)
    for task in ("a", "b"):
        acc = accuracy(module.model, dm, task)
        assert m[f"val/{task}/acc"] == pytest.approx(acc, abs=1e-6)  # each dataloader its own metric
        assert 0.0 <= m[f"val/{task}/f1"] <= 1.0 and m[f"val/{task}/loss"] > 0
    assert m["val/acc_mean"] == pytest.approx((m["val/a/acc"] + m["val/b/acc"]) / 2, abs=1e-6)
    assert m["val/f1_mean"] == pytest.approx((m["val/a/f1"] + m["val/b/f1"]) / 2, abs=1e-6)
    assert m["val/a/normalized"] == pytest.approx(m["val/a/acc"] / 0.5, abs=1e-6)
    assert m["val/b/normalized"] == pytest.approx(m["val/b/acc"] / 0.8, abs=1e-6)
    assert m["val/normalized_mean"] == pytest.approx((m["val/a/normalized"] + m["val/b/normalized"]) / 2, abs=1e-6)

    trainer = run(tmp_path, "test", module, dm)
    t = metrics(trainer)
    assert {"test/a/acc", "test/b/f1", "test/acc_mean", "test/normalized_mean"} <= set(t)
    assert t["test/b/acc"] == pytest.approx(accuracy(module.model, dm, "b", "test"), abs=1e-6)
    assert not any(k.startswith("val/") for k in t)


def test_task_names(tmp_path, models):
    dm = synthetic()
    trainer = run(tmp_path, "validate", SequenceClassifier(models["clf"], LABELS, task_names=["x", "y"]), dm)
    assert {"val/x/acc", "val/y/acc"} <= set(trainer.callback_metrics)
    # plain dataloaders, no names anywhere: task0, task1
    module = SequenceClassifier(models["clf"], LABELS)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, dataloaders=dm.val_dataloader())
    assert {"val/task0/acc", "val/task1/acc", "val/acc_mean"} <= set(trainer.callback_metrics)
    with pytest.raises(ConfigError, match="3 task_names"):
        run(tmp_path, "validate", SequenceClassifier(models["clf"], LABELS, task_names=["x", "y", "z"]), dm)
    with pytest.raises(ConfigError, match="finetune"):
        SequenceClassifier(models["clf"], LABELS, finetune="all")


class Snapshot(Callback):
    """The module's trainable parameter names and its model's tensors at fit start."""

    def on_fit_start(self, trainer, pl_module):
        self.trainable = [n for n, p in pl_module.named_parameters() if p.requires_grad]
        self.model_type = type(pl_module.model).__name__
        self.state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


def test_lora_finetuning_after_merge(tmp_path, models):
    dm = synthetic()
    module = SequenceClassifier(models["clf"], LABELS, finetune="lora", lora_r=2, lr=1e-2)
    merge = MergeCallback([models["e0"], models["e1"]], Ties(density=0.5), target="model")
    snap = Snapshot()
    run(tmp_path, "fit", module, dm, callbacks=[merge, snap], limit_train_batches=3, limit_val_batches=0)
    expected = merge_models(models["clf"], [models["e0"], models["e1"]], Ties(density=0.5))
    assert merge.merged and snap.model_type == "PeftModel"
    assert snap.trainable and all("lora_" in n for n in snap.trainable)  # LoRA (q_proj, v_proj) only
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in snap.trainable} == {"q_proj", "v_proj"}
    after = module.model.state_dict()
    lora_b = [k for k in after if "lora_B" in k]
    assert lora_b and all(torch.count_nonzero(snap.state[k]) == 0 for k in lora_b)  # PEFT init: B = 0
    assert any(torch.count_nonzero(after[k]) > 0 for k in lora_b)  # ... trained
    # the frozen weights are the merge, untouched by training
    plain = {k.replace(".base_layer", "").removeprefix("base_model.model."): k for k in after}
    assert set(expected) <= set(plain)
    for name, value in expected.items():
        assert torch.equal(after[plain[name]], value), name


def test_head_finetuning(tmp_path, models):
    dm = synthetic()
    module = SequenceClassifier(models["clf"], LABELS, finetune="head", lr=1e-2)
    snap = Snapshot()
    run(tmp_path, "fit", module, dm, callbacks=[snap], limit_train_batches=2, limit_val_batches=0)
    assert snap.trainable == ["model.score.weight"]
    after = module.model.state_dict()
    assert not torch.equal(after["score.weight"], snap.state["score.weight"])
    assert all(torch.equal(after[k], v) for k, v in snap.state.items() if k != "score.weight")


# ------------------------------------------------------------------------------------- causal LM

def test_causal_lm_loss_and_perplexity(tmp_path, models):
    dm = synthetic(num_labels=None, n_val=16)
    module = CausalLM(models["lm"])
    trainer = run(tmp_path, "validate", module, dm)
    m = metrics(trainer)
    with torch.no_grad():
        for task in ("a", "b"):
            ds = dm.dataset("val", task).tensors
            ref = float(module.model(input_ids=ds["input_ids"], labels=ds["labels"]).loss)
            assert m[f"val/{task}/loss"] == pytest.approx(ref, rel=1e-5)
            assert m[f"val/{task}/ppl"] == pytest.approx(math.exp(ref), rel=1e-5)
    assert m["val/loss_mean"] == pytest.approx((m["val/a/loss"] + m["val/b/loss"]) / 2, rel=1e-6)
    assert m["val/ppl_mean"] == pytest.approx((m["val/a/ppl"] + m["val/b/ppl"]) / 2, rel=1e-6)
    head = CausalLM(models["lm"], finetune="head")
    assert [n for n, p in head.named_parameters() if p.requires_grad] == ["model.lm_head.weight"]
    # training lowers the loss on a learnable synthetic task
    module = CausalLM(models["lm"], lr=3e-3)
    dm = synthetic(num_labels=None, tasks=["a"], n_train=128, n_val=16)
    run(tmp_path, "fit", module, dm, max_epochs=2, limit_val_batches=0)
    trainer = run(tmp_path, "validate", module, dm)
    assert float(trainer.callback_metrics["val/a/loss"]) < m["val/a/loss"]
