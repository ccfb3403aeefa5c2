"""The ``--tiny`` stand-ins: synthetic data in the corpora's layout, a word-level tokenizer and a tiny
random Llama (tied embeddings, grouped-query attention) — so the whole pipeline runs in a minute, offline,
without the data packages.

Synthetic task t, class c: a sentence of random filler words with one cue word ``<task>cue<c>`` at a
random place, so an expert can learn it and a base cannot know it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lm_data import LABEL_WORDS, PROMPTS

#: the corpora's label names per task (their ``labels.json``)
LABELS = {
    "sentiment": ["rotten", "fresh"],
    "subjectivity": ["objective", "subjective"],
    "topic": ["business", "entertainment", "politics", "sport", "tech"],
    "supersense": ["animal", "artifact", "body", "food", "location", "person", "plant", "substance"],
}
FILLER = [f"w{i}" for i in range(40)]


def write_data(root: Path, sizes: dict[str, int], seed: int = 0) -> dict[str, dict[str, str]]:
    """``<root>/<task>/<split>.jsonl`` + ``labels.json`` as :func:`corpora.prepare` writes them."""
    rng = random.Random(seed)
    files: dict[str, dict[str, str]] = {}
    for task, names in LABELS.items():
        tdir = root / task
        tdir.mkdir(parents=True, exist_ok=True)
        (tdir / "labels.json").write_text(json.dumps(names))
        files[task] = {}
        for split, n in sizes.items():
            lines = []
            for _ in range(n):
                c = rng.randrange(len(names))
                words = rng.sample(FILLER, rng.randint(3, 8))
                words.insert(rng.randrange(len(words) + 1), f"{task}cue{c}")
                lines.append(json.dumps({"text": " ".join(words), "label": c}))
            path = tdir / f"{split}.jsonl"
            path.write_text("\n".join(lines) + "\n")
            files[task][split] = str(path)
    return files


def write_base(out: Path, seed: int = 0) -> str:
    """A word-level tokenizer over every word the tiny prompts use, and a random 4-block Llama, in ``out``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = set(FILLER) | {w.strip() for w in LABEL_WORDS.values()}
    words |= {f"{t}cue{c}" for t, n in LABELS.items() for c in range(len(n))}
    pre = pre_tokenizers.Whitespace()
    for prefix, suffix in PROMPTS.values():
        words |= {w for w, _ in pre.pre_tokenize_str(prefix + " " + suffix)}
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2}
    for w in sorted(words):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=None, eos_token_id=2)
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return str(out)
