"""Shared set-up of the real-text tests: a tiny random BERT encoder with MiniLM's tokenizer, small
real-data splits, and probe heads (not a test module)."""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_merge.errors import SourceError
from lightning_merge.examples.corpora import minilm_dir, prepare

try:
    MINILM: str | None = minilm_dir()
except SourceError:  # pragma: no cover - `make test` installs it
    MINILM = None


def tiny_text_experiment(root: Path, tasks: list[str], sizes: dict[str, int], *, max_length: int = 24,
                         batch_size: int = 16, eval_batch_size: int = 32):
    """An ``Experiment`` over a 2-layer, hidden-32 random BERT (MiniLM's vocabulary) with fitted heads."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from lightning_merge.examples.workflow import Experiment, prepare_heads

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(root / "base")
    AutoTokenizer.from_pretrained(MINILM).save_pretrained(root / "base")
    files = prepare(root / "data", tasks, sizes)
    exp = Experiment(base=str(root / "base"), files=files, heads=str(root / "heads.safetensors"),
                     max_length=max_length, batch_size=batch_size, eval_batch_size=eval_batch_size)
    prepare_heads(exp)
    return exp
