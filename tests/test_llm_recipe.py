"""recipes/llm_lora.yaml (search, then fine-tune, on a causal LM) and its inputs
(:mod:`lightning_merge.examples.smollm2`, :mod:`lightning_merge.examples.label_words`): the data module
and the label-word module built from plain arguments on the tiny stand-in (fast); the recipe parses
(fast); ``smollm2 --tiny`` then the recipe as written, end to end (slow, ~1 minute on 2 cores)."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from lightning_merge import MergeCallback, get_method, merge_models
from lightning_merge.errors import ConfigError
from lightning_merge.examples.label_words import LABEL_WORDS, LabelWordLM, PromptDataModule, PromptSet
from lightning_merge.examples.smollm2 import LABELS, TASKS, prepare, write_tiny_base, write_tiny_data
from lightning_merge.lightning_cli import main

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "llm_lora.yaml"
CANDIDATES = [("task_arithmetic", {"lambda": 0.4}), ("task_arithmetic", {"lambda": 1.0}),
              ("ties", {"density": 0.3, "lambda": 1.0}), ("dare_ties", {"density": 0.3, "lambda": 1.0}),
              ("della", {"density": 0.3, "epsilon": 0.14, "lambda": 1.0})]


def _trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_data_module_and_label_word_lm_from_plain_arguments(tmp_path):
    """From a data folder and task names: the answer ids are each label word's token (from
    labels.json), LabelWordLM without label_ids takes them in setup, and its accuracy is the argmax
    over the label words of the next-token logits, prompt by prompt."""
    from transformers import AutoTokenizer

    base = write_tiny_base(tmp_path / "base")
    write_tiny_data(tmp_path / "data", {"val": 12})
    tasks = ["sentiment", "topic"]
    dm = PromptDataModule(base, data_dir=str(tmp_path / "data"), eval_tasks=tasks, eval_split="val",
                          eval_batch_size=5)
    tok = AutoTokenizer.from_pretrained(base)
    expected = {t: [tok.convert_tokens_to_ids(LABEL_WORDS[n].strip()) for n in LABELS[t]] for t in tasks}
    assert dm.targets == expected and dm.task_names == tasks
    assert len(set(expected["topic"])) == 5 and tok.unk_token_id not in expected["topic"]

    module = LabelWordLM(base)
    metrics = _trainer().validate(module, datamodule=dm, verbose=False)[0]
    assert module.label_ids == expected
    for t in tasks:
        rows = PromptSet(tok, tmp_path / "data" / t / "val.jsonl", t, 0, expected[t], max_length=48,
                         by_length=False).rows
        with torch.no_grad():
            preds = [int(module.model(torch.tensor([r["input_ids"]])).logits[0, -1, expected[t]].argmax())
                     for r in rows]
        hits = [p == r["label"] for p, r in zip(preds, rows)]
        assert metrics[f"val/{t}/acc"] == pytest.approx(sum(hits) / len(rows), abs=1e-6)
        assert {i: v[0] for i, v in module.outcomes[("val", t)].items()} == {r["idx"]: h for r, h in zip(rows, hits)}

    with pytest.raises(ConfigError, match=r"train split of task 'topic'.*smollm2"):
        PromptDataModule(base, data_dir=str(tmp_path / "data"), train_tasks=["topic"], eval_split="val")
    with pytest.raises(ConfigError, match="exactly one of files"):
        PromptDataModule(base, eval_tasks=tasks)


def test_recipe_parses_with_its_classes(monkeypatch, capsys, tmp_path):
    """--print_config resolves every class of the recipe and is a fixed point."""
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(RECIPE), "--print_config"]) == 0
    printed = capsys.readouterr().out
    cfg = yaml.safe_load(printed)
    assert cfg["model"]["class_path"] == "lightning_merge.examples.label_words.LabelWordLM"
    assert cfg["data"]["class_path"] == "lightning_merge.examples.label_words.PromptDataModule"
    assert cfg["model"]["init_args"]["finetune"] == "full" and cfg["model"]["init_args"]["train_layers"] == \
        list(range(22, 30))
    [search] = cfg["trainer"]["callbacks"]
    assert search["class_path"] == "lightning_merge.MergeSearch"
    args = search["init_args"]
    assert [(c.pop("method"), c) for c in args["candidates"]] == CANDIDATES
    assert args["experts"] == [f"out/llm/experts/{t}" for t in TASKS] and args["monitor"] == "val/acc_mean"
    (tmp_path / "printed.yaml").write_text(printed)
    assert main(["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"]) == 0
    assert capsys.readouterr().out == printed


@pytest.mark.slow
def test_recipe_searches_then_finetunes_the_best_merge(tmp_path, monkeypatch):
    """``smollm2 --tiny`` into out/llm, then the recipe as written (its own relative paths) with the
    tiny model's upper blocks and 4 fine-tuning steps: every candidate is scored, the best by
    val/acc_mean is chosen (its score is a plain validation of that merge), and fine-tuning starts
    from exactly that merge and changes only the upper blocks and the final norm."""
    from lightning_merge.examples.smollm2 import main as smollm2_main

    out = tmp_path / "out" / "llm"
    assert smollm2_main([str(out), "--tiny"]) == 0
    assert prepare(out, tiny=True)["settings"]["steps"] == 100  # a rerun keeps everything
    monkeypatch.chdir(tmp_path)
    steps = 4
    assert main(["fit", "--config", str(RECIPE), "--model.init_args.train_layers=[2,3]", "--model.init_args.lr=1e-3",
                 f"--trainer.limit_train_batches={steps}", "--trainer.log_every_n_steps=1"]) == 0
    run = out / "runs" / "llm_lora" / "lightning_logs" / "version_0"
    with (run / "merge_search.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["method"], r["lambda"], r["density"], r["epsilon"]) for r in rows] == [
        (m, str(p["lambda"]), str(p.get("density", "")), str(p.get("epsilon", ""))) for m, p in CANDIDATES]
    scores = [float(r["val/acc_mean"]) for r in rows]
    assert [int(r["best"]) for r in rows].count(1) == 1
    best = next(i for i, r in enumerate(rows) if r["best"] == "1")
    assert best == scores.index(max(scores))  # the first of the highest
    assert len(set(scores)) > 1  # the tiny experts learn their tasks: the merges differ

    method, params = CANDIDATES[best]
    experts = [str(out / "experts" / t) for t in TASKS]
    base = str(out / "base")
    dm = PromptDataModule(base, data_dir=str(out / "data"), eval_tasks=list(TASKS), eval_split="val")
    alone = _trainer(callbacks=[MergeCallback(experts, get_method(method, **params), target="model", seed=0)]) \
        .validate(LabelWordLM(base), datamodule=dm, verbose=False)[0]
    assert alone["val/acc_mean"] == pytest.approx(scores[best], abs=1e-6)

    with (run / "metrics.csv").open() as fh:
        logged = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in logged if r["train/loss"]] == list(range(steps))
    assert [r for r in logged if r["val/acc_mean"]]  # the fine-tuned merge was validated
    [ckpt] = run.glob("checkpoints/*.ckpt")
    assert ckpt.name == f"epoch=0-step={steps}.ckpt"
    weights = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    merged = merge_models(base, experts, get_method(method, **params), seed=0)
    assert any(".layers.2." in n for n in merged) and any(".layers.0." in n for n in merged)
    for name, value in merged.items():
        if name.startswith(("model.layers.2.", "model.layers.3.", "model.norm.")):
            assert not torch.allclose(weights[f"model.{name}"], value, atol=1e-6), name  # trained
        else:
            torch.testing.assert_close(weights[f"model.{name}"], value, atol=1e-6, rtol=0)  # frozen: the merge
