"""Tiny random MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE) for tests and the smoke recipe.

``python -m lightning_merge.moe.tiny out/recipes`` writes ``out/recipes/moe_base``: a random
Mixtral sequence classifier (hidden 32, 2 layers, 8 experts, top-2, vocab 128, 4 labels) that
``recipes/mcsmoe.yaml`` loads.
"""

from __future__ import annotations

import argparse
import logging
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ARCHS", "make_recipe_moe", "tiny_config", "tiny_moe"]

log = logging.getLogger(__name__)

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe")


def tiny_config(arch: str = "mixtral", *, num_experts: int = 8, top_k: int = 2, hidden: int = 32,
                intermediate: int = 16, layers: int = 2, vocab: int = 64, **extra: Any) -> Any:
    """A small config of ``arch`` (eager attention, no dropout)."""
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=top_k, max_position_embeddings=128,
                  attn_implementation="eager", **extra)
    if arch == "mixtral":
        return MixtralConfig(num_local_experts=num_experts, intermediate_size=intermediate, **common)
    if arch == "qwen2_moe":
        return Qwen2MoeConfig(num_experts=num_experts, moe_intermediate_size=intermediate, intermediate_size=2 * hidden,
                              shared_expert_intermediate_size=intermediate, **common)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(num_experts=num_experts, moe_intermediate_size=intermediate, intermediate_size=2 * hidden,
                              head_dim=hidden // 4, **common)
    raise ValueError(f"unknown arch {arch!r}; one of {ARCHS}")


def tiny_moe(arch: str = "mixtral", *, seed: int = 0, head: str = "causal", num_labels: int = 2,
             **config: Any) -> nn.Module:
    """A random model (``head``: ``causal`` or ``classifier``) in eval mode, weights ~ N(0, 0.2²)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = tiny_config(arch, **config)
    torch.manual_seed(seed)
    if head == "classifier":
        cfg.num_labels = num_labels
        cfg.pad_token_id = 0
        model = AutoModelForSequenceClassification.from_config(cfg)
    else:
        model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # a larger spread than the 0.02 default, so routing is not near-uniform
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(zlib.crc32(name.encode()) + seed))
    return model.eval()


def make_recipe_moe(out: str | Path, seed: int = 0) -> Path:
    """``<out>/moe_base``: the model of ``recipes/mcsmoe.yaml`` (module doc)."""
    path = Path(out) / "moe_base"
    tiny_moe("mixtral", seed=seed, head="classifier", num_labels=4, vocab=128, intermediate=32).save_pretrained(path)
    log.info("wrote %s", path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write moe_base into (e.g. out/recipes)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    make_recipe_moe(args.out, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
