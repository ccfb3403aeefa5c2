"""A small "zoo" of inputs for merge tests: a base, perturbed full copies, and a PEFT LoRA adapter
(not a test module)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn


def save_zoo(root: Path, make: Callable[[int], nn.Module], scales: Sequence[float], *, lora_r: int,
             lora_targets: Sequence[str] = ("q_proj", "v_proj"), seed: int = 1) -> dict[str, str]:
    """Write ``base/`` (= ``make(0)``), ``e<i>/`` (base + ``scales[i]`` x N(0, 1) on every parameter) and
    ``lora/`` (a rank-``lora_r`` adapter with random B); return ``{name: path}``."""
    from peft import LoraConfig, get_peft_model

    make(0).save_pretrained(root / "base")
    gen = torch.Generator().manual_seed(seed)
    for i, scale in enumerate(scales):
        m = make(0)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(scale * torch.randn(p.shape, generator=gen))
        m.save_pretrained(root / f"e{i}")
    peft_model = get_peft_model(make(0), LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=list(lora_targets)))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(root / "lora")
    return {k: str(root / k) for k in ("base", *(f"e{i}" for i in range(len(scales))), "lora")}
