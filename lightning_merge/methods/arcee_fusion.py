"""Arcee Fusion (Arcee AI, https://arcee.ai; mergekit's ``arcee_fusion``), with mergekit 0.1.5's
importance and threshold. Weight space, the base and exactly one expert.

With a = θ₀ (the base) and b = θ₁ (the expert), softmax and sums over the last dimension (a 1-D
tensor is one row):

    p   = softmax(b) + 1e-8,   q = softmax(a) + 1e-8
    KL  = Σ_last p · log(p / q)                          one value per row (KL(p ‖ q))
    I   = |b − a| · KL                                   importance of each entry
    Q1, Q2, Q3 = order statistics of I at positions ⌊(0.25, 0.5, 0.75) · (m − 1)⌋ (0-based,
                 ascending; the index product in float32, as mergekit) over m values
    τ   = Q2 + 1.5 · (Q3 − Q1)                           the outlier fence of a box plot
    θ*  = a + (b − a) · [I ≥ τ]

so only the entries whose importance is an upper outlier take the expert's value; the rest stay
the base. The quantiles are exact order statistics, not interpolated. A row where the expert only
adds a constant has KL = 0 (softmax is shift-invariant), hence importance 0 there. With zero
deltas I = 0 = τ and every entry is "kept": θ* = θ₀.

Sampling: mergekit 0.1.5 computes the quantiles of a tensor of more than 1,000,000 entries from
1,000,000 entries drawn uniformly with replacement (from torch's global generator). We draw the
same sample size from the generator of (seed, tensor, expert), so the threshold has mergekit's
distribution; ``quantile_sample=None`` uses every entry (exact, deterministic, slower).

mergekit 0.1.5's ``arcee_fusion`` has no parameters and no ``weight`` (it silently ignores one);
here per-expert weights other than 1 are an error. A tensor only one model holds is copied from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .base import MergeMethod, TensorInputs, explain
from .yaml_spec import Contract, MergekitSpec

#: mergekit 0.1.5's ``_QUANTILE_SAMPLE_SIZE``
QUANTILE_SAMPLE = 1_000_000
FUSION_EPS = 1e-8
IQR_FACTOR = 1.5


def fusion_importance(expert: Tensor, base: Tensor) -> Tensor:
    """I = |θ₁ − θ₀| · KL(softmax θ₁ ‖ softmax θ₀) per row (last dimension), float32."""
    p = F.softmax(expert, dim=-1) + FUSION_EPS
    q = F.softmax(base, dim=-1) + FUSION_EPS
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (expert - base).abs() * kl


def fusion_threshold(importance: Tensor, sample: int | None = QUANTILE_SAMPLE,
                     gen: torch.Generator | None = None) -> Tensor:
    """τ = Q2 + 1.5 (Q3 − Q1) from order statistics (0-d tensor); ``sample`` entries drawn with
    replacement with ``gen`` when the tensor has more."""
    flat = importance.reshape(-1)
    if sample is not None and flat.numel() > sample:
        flat = flat[torch.randint(flat.numel(), (sample,), generator=gen, device=flat.device)]
    m = flat.numel()
    pos = (torch.tensor([0.25, 0.5, 0.75], dtype=torch.float32) * (m - 1)).long().tolist()
    q1, q2, q3 = (torch.kthvalue(flat, i + 1).values for i in pos)
    return q2 + IQR_FACTOR * (q3 - q1)


@dataclass(frozen=True, kw_only=True)
class ArceeFusion(MergeMethod):
    """Arcee Fusion: take the expert's value only where |δ| · KL(row) is an upper outlier.

    Attributes:
        quantile_sample: the quantiles of a tensor with more entries than this are estimated from
            this many entries drawn with replacement (mergekit 0.1.5: 1,000,000, the default);
            None: exact over every entry.
    """

    name = "arcee_fusion"
    contract = Contract(typical={}, min_experts=1, max_experts=1)
    reference = "Arcee AI, Arcee Fusion (https://arcee.ai; mergekit's arcee_fusion)"
    mergekit = MergekitSpec("arcee_fusion", {}, "required",
                            lambda s, pm, n: ("arcee_fusion", {"quantile_sample": QUANTILE_SAMPLE}), 1, 1)
    space = "weight"
    quantile_sample: int | None = QUANTILE_SAMPLE

    def __post_init__(self) -> None:
        q = self.quantile_sample
        if q is not None and (isinstance(q, bool) or not isinstance(q, int) or q < 1):
            raise ConfigError(f"{self.name}: parameter 'quantile_sample' must be a positive integer or None "
                              f"(exact quantiles), got {q!r}; mergekit uses {QUANTILE_SAMPLE}")

    def check_experts(self, n_experts: int) -> None:
        super().check_experts(n_experts)
        if n_experts != 1:
            raise ConfigError(f"{self.name}: fuses the base with exactly one expert, got {n_experts} experts; "
                              "for more models use 'linear', 'ties' or 'sce'")

    def merge(self, inputs: TensorInputs) -> Tensor:
        if inputs.base is None:
            raise ConfigError(f"{self.name} needs a base model; pass base=...")
        if any(w != 1.0 for w in inputs.weights):
            raise ConfigError(f"{self.name}: per-expert weights {inputs.weights} are not supported (mergekit "
                              "has no 'weight' for arcee_fusion); remove the weights")
        base = inputs.base
        if not inputs.tensors or base.numel() == 0:
            return base.clone()
        if len(inputs.tensors) != 1:
            raise ConfigError(f"{self.name}: fuses the base with exactly one expert, "
                              f"got {len(inputs.tensors)} for tensor '{inputs.name}'")
        expert = inputs.tensors[0]
        importance = fusion_importance(expert, base)
        sampled = self.quantile_sample is not None and importance.numel() > self.quantile_sample
        tau = fusion_threshold(importance, self.quantile_sample, inputs.generator(0) if sampled else None)
        mask = (importance >= tau).float()
        return base + (expert - base) * mask


explain(ArceeFusion, math=__doc__)

__all__ = ["FUSION_EPS", "QUANTILE_SAMPLE", "ArceeFusion", "fusion_importance", "fusion_threshold"]
