"""The causal-LM benchmark (benchmarks/causal_lm): its label-word scoring on a tiny random Llama with exact
expectations (fast), and ``run.py --tiny`` end to end (slow: ~1.5 minutes on 2 cores)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "causal_lm"
sys.path.insert(0, str(BENCH))

from lm_data import PROMPTS, PromptSet, collate, label_token_ids  # noqa: E402
from lm_scoring import LabelWordLM, answer_logprobs  # noqa: E402

from lightning_merge.errors import ConfigError  # noqa: E402


def _tiny_llama(vocab: int = 50) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def test_answer_logprobs_is_the_next_token_log_softmax_at_the_last_real_token():
    model = _tiny_llama()
    prompts = [[5, 9, 3, 7, 11], [4, 8], [13, 2, 6]]
    batch = collate([{"input_ids": p, "target": 1, "label": 0, "idx": i, "task": 0} for i, p in enumerate(prompts)],
                    pad_id=0)
    with torch.no_grad():
        lp = answer_logprobs(model, batch["input_ids"], batch["attention_mask"])
        for i, p in enumerate(prompts):
            logits = model(torch.tensor([p])).logits[0, -1].double()  # each prompt alone, no padding
            by_hand = logits - math.log(float(torch.exp(logits).sum()))  # log-softmax written out
            torch.testing.assert_close(lp[i].double(), by_hand, atol=2e-5, rtol=0)
            # the label-word score of word ids [7, 12] is those two entries
            assert torch.allclose(lp[i, [7, 12]].double(), by_hand[[7, 12]], atol=2e-5)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(3), atol=1e-5)


def test_label_word_lm_accuracy_equals_the_argmax_over_label_words(tmp_path):
    from lm_tiny import write_base, write_data

    from lightning_merge.lightning.tasks import CausalLM

    base = write_base(tmp_path / "base")
    files = write_data(tmp_path / "data", {"test": 10})
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    words = {"sentiment": [" negative", " positive"], "topic": [" business", " entertainment", " politics",
                                                                " sport", " tech"]}
    ids = {t: label_token_ids(tok, w)[0] for t, w in words.items()}
    module = LabelWordLM(base, ids, task_names=list(words))
    assert isinstance(module, CausalLM)
    import lightning.pytorch as pl
    from lm_data import PromptDataModule

    dm = PromptDataModule(base, files, ids, eval_tasks=list(words), eval_batch_size=4)
    metrics = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False) \
        .test(module, datamodule=dm, verbose=False)[0]
    for t in words:
        ds = PromptSet(tok, files[t]["test"], t, 0, ids[t], max_length=48, by_length=False)
        correct = 0
        with torch.no_grad():
            for r in ds.rows:
                logits = module.model(torch.tensor([r["input_ids"]])).logits[0, -1]
                pred = int(logits[ids[t]].argmax())  # softmax normalisation does not change the argmax
                correct += pred == r["label"]
                assert module.outcomes[("test", t)][r["idx"]][0] == (pred == r["label"])
        assert metrics[f"test/{t}/acc"] == pytest.approx(correct / len(ds.rows), abs=1e-6)


def test_prompts_fit_max_length_and_label_words_must_differ(tmp_path):
    from lm_tiny import write_base, write_data
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(write_base(tmp_path / "base"))
    files = write_data(tmp_path / "data", {"test": 5})
    ds = PromptSet(tok, files["supersense"]["test"], "supersense", 0, list(range(8)), max_length=24, by_length=True)
    assert all(len(r["input_ids"]) <= 24 for r in ds.rows)
    lengths = [len(r["input_ids"]) for r in ds.rows]
    assert lengths == sorted(lengths, reverse=True) and sorted(r["idx"] for r in ds.rows) == list(range(5))
    assert set(PROMPTS) == {"sentiment", "subjectivity", "topic", "supersense"}
    with pytest.raises(ConfigError, match="share a first token"):
        label_token_ids(tok, [" sport", " sport"])
    with pytest.raises(ConfigError, match="leaves"):
        PromptSet(tok, files["supersense"]["test"], "supersense", 0, list(range(8)), max_length=8, by_length=True)


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tmp_path):
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--tiny", "--workdir", str(work)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((work / "tiny" / "results.json").read_text())
    tasks = data["meta"]["tasks"]
    assert tasks == ["sentiment", "subjectivity", "topic", "supersense"]
    rows = data["rows"]
    kinds = [r["kind"] for r in rows]
    assert kinds.count("base") == 1 and kinds.count("expert") == 8
    fams = {(r["regime"], r["family"]) for r in rows if r["kind"] == "merge"}
    for regime in ("lora", "full"):
        assert {(regime, f) for f in ("task_arithmetic", "ties", "dare_ties", "della", "adaptive_rms_pooled",
                                      "adaptive_rms_own", "dppa", "tsv_m", "iso_c")} <= fams
    assert ("lora", "dare_ties_norescale") in fams
    for k in ("peft", "searched", "finetuned", "ddp", "ddp_ref"):
        assert k in kinds, k
    for r in rows:
        split = r["split"]
        for t in tasks:
            assert r["n"][t] == data["meta"]["sizes"][t][split]
            assert 0.0 <= r["acc"][t] <= 1.0 and math.isfinite(r["nll"][t]) and r["nll"][t] > 0
    ddp = next(r for r in rows if r["kind"] == "ddp")
    assert ddp["same_bits_as_1_process"] and ddp["max_nll_sum_diff"] < 1e-3
    ta32 = next(r for r in rows if r["kind"] == "peft" and r["params"]["adapter_rank"] == 32)
    assert ta32["reconstruction_error"]["max"] < 1e-4  # four rank-8 adapters summed: rank 32 is exact
    dense = next(r for r in rows if r["kind"] == "merge" and r["regime"] == "lora"
                 and r["name"] == "task_arithmetic" and r["params"] == {"lambda": 1.0})
    assert ta32["bits"] == dense["bits"]
    assert (work / "tiny" / "experts" / "lora" / "topic" / "adapter_config.json").is_file()
    report = (work / "tiny" / "results.md").read_text()
    assert "## Claims" in report and "DELLA beats DARE-TIES" in report
    assert (work / "tiny" / "results_drop.png").stat().st_size > 5_000
    assert any(k.startswith("stage lora") for k in data["timings"])
    # a rerun finds everything cached and adds no row
    again = subprocess.run([sys.executable, str(BENCH / "run.py"), "--tiny", "--workdir", str(work), "--stage",
                            "base", "lora", "merges"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(json.loads((work / "tiny" / "results.json").read_text())["rows"]) == len(rows)
