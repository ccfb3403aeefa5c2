"""Create the tiny offline models the smoke recipes (``recipes/*.yaml``) merge.

    python -m lightning_merge.examples.make_recipe_models out/recipes [--steps 60] [--seed 0]

writes, in a few seconds on a CPU, without any network:

* ``base/``: a randomly initialized 2-layer Llama sequence classifier (hidden 64, vocabulary 128,
  4 labels) with a word-level tokenizer (``[PAD]`` = 0, ``[UNK]`` = 1, ``w2`` ... ``w127``);
* ``expert_a/``, ``expert_b/``: full fine-tunes of ``base`` on the synthetic tasks ``a`` and ``b``
  of :class:`~lightning_merge.lightning.data.SyntheticTokensDataModule` (each task draws its
  tokens from its own third of the vocabulary; the label is the last token mod 4);
* ``lora_c/``: a PEFT LoRA adapter (r=4 on ``q_proj``/``v_proj``) trained on task ``c``;
* ``scores.json``: validation accuracy of the base and of every expert on every task (use an
  expert's score on its own task as ``SequenceClassifier(expert_scores=...)``).

The same data module settings (``vocab_size=128, seq_len=16, num_labels=4, tasks=[a, b, c]``)
are what the recipes evaluate on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["RECIPE_DATA", "build_tokenizer", "make_recipe_models", "save_tiny_model", "tiny_config"]

#: the SyntheticTokensDataModule settings the recipe models are trained for
RECIPE_DATA: dict[str, Any] = {"vocab_size": 128, "seq_len": 16, "num_labels": 4, "tasks": ["a", "b", "c"]}
#: the experts written by :func:`make_recipe_models`: folder -> (task, kind)
RECIPE_EXPERTS: dict[str, tuple[str, str]] = {"expert_a": ("a", "full"), "expert_b": ("b", "full"),
                                              "lora_c": ("c", "lora")}


def build_tokenizer(vocab_size: int) -> Any:
    """A word-level fast tokenizer: ``[PAD]`` = 0, ``[UNK]`` = 1, ``w<i>`` = i, split on whitespace."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   model_input_names=["input_ids", "attention_mask"])


def tiny_config(kind: Literal["classifier", "causal_lm"] = "classifier", *, vocab_size: int = 128,
                num_labels: int = 4, hidden_size: int = 64, num_layers: int = 2) -> Any:
    """A small Llama configuration (pad token 0, untied embeddings)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                      max_position_embeddings=256, pad_token_id=0, bos_token_id=None, eos_token_id=None,
                      tie_word_embeddings=False)
    if kind == "classifier":
        cfg.num_labels = num_labels
    return cfg


def save_tiny_model(path: str | os.PathLike, kind: Literal["classifier", "causal_lm"] = "classifier", *,
                    seed: int = 0, **config: Any) -> nn.Module:
    """Save a randomly initialized tiny Llama (and its tokenizer) as a Hugging Face folder; returns it."""
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    cfg = tiny_config(kind, **config)
    torch.manual_seed(seed)
    model = (LlamaForSequenceClassification if kind == "classifier" else LlamaForCausalLM)(cfg)
    model.save_pretrained(path)
    build_tokenizer(cfg.vocab_size).save_pretrained(path)
    return model


def _batches(task: str, split: str, n: int, batch_size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    from ..lightning.data import synthetic_tokens

    d = RECIPE_DATA
    data = synthetic_tokens(d["vocab_size"], d["seq_len"], n, task_index=d["tasks"].index(task),
                            n_tasks=len(d["tasks"]), task=task,
                            num_labels=d["num_labels"], seed=seed, split=split)
    return [{k: v[i:i + batch_size] for k, v in data.items()} for i in range(0, n, batch_size)]


@torch.no_grad()
def accuracy(model: nn.Module, task: str, seed: int = 0, n: int = 256) -> float:
    model.eval()
    hits = 0
    for b in _batches(task, "val", n, 64, seed):
        hits += int((model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1)
                     == b["labels"]).sum())
    return hits / n


def _train(model: nn.Module, task: str, steps: int, lr: float, seed: int) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    batches = _batches(task, "train", 32 * steps, 32, seed)
    model.train()
    for b in batches:
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def make_recipe_models(out: str | os.PathLike, *, steps: int = 60, seed: int = 0, overwrite: bool = True,
                       verbose: bool = False) -> dict[str, str]:
    """Write ``base/``, ``expert_a/``, ``expert_b/``, ``lora_c/`` and ``scores.json`` under ``out``.

    Deterministic for a given (steps, seed) on one machine. Each folder is built in a temporary
    folder beside it and renamed into place. Returns ``{name: path}``.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForSequenceClassification

    out = Path(out)
    names = ["base", *RECIPE_EXPERTS]
    paths = {k: str(out / k) for k in names}
    if not overwrite and all((out / k).exists() for k in names) and (out / "scores.json").exists():
        return paths
    out.mkdir(parents=True, exist_ok=True)
    d = RECIPE_DATA
    tmp = Path(tempfile.mkdtemp(prefix=".make-", dir=out))
    try:
        save_tiny_model(tmp / "base", "classifier", seed=seed, vocab_size=d["vocab_size"], num_labels=d["num_labels"])
        base_path = str((out / "base").resolve())
        scores: dict[str, dict[str, float]] = {}

        def load() -> nn.Module:
            m = LlamaForSequenceClassification.from_pretrained(tmp / "base", dtype=torch.float32)
            m.config._name_or_path = base_path  # recorded as base_model_name_or_path by PEFT
            return m

        scores["base"] = {t: accuracy(load(), t, seed) for t in d["tasks"]}
        tok = build_tokenizer(d["vocab_size"])
        for k, (name, (task, kind)) in enumerate(RECIPE_EXPERTS.items()):
            torch.manual_seed(seed + 1 + k)
            model = load()
            if kind == "lora":
                model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
                _train(model, task, steps, 1e-2, seed)
                model.save_pretrained(tmp / name)
            else:
                _train(model, task, steps, 3e-3, seed)
                model.save_pretrained(tmp / name)
                tok.save_pretrained(tmp / name)
            scores[name] = {t: accuracy(model, t, seed) for t in d["tasks"]}
            if verbose:
                log.info("%s (task %s, %s): %s", name, task, kind,
                         ", ".join(f"{t} {v:.2f}" for t, v in scores[name].items()))
        (tmp / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
        for k in [*names, "scores.json"]:
            dest = out / k
            if dest.is_dir():
                shutil.rmtree(dest)
            elif dest.exists():
                dest.unlink()
            os.replace(tmp / k, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_merge.examples.make_recipe_models",
                                     description="Write the tiny offline models of the smoke recipes.")
    parser.add_argument("out", nargs="?", default="out/recipes", help="output folder (default: out/recipes)")
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps per expert (default 60)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    paths = make_recipe_models(args.out, steps=args.steps, seed=args.seed, verbose=True)
    log.info("wrote %s and scores.json under %s", ", ".join(paths), args.out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
