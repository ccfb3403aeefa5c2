"""SCE, Select-Calculate-Erase (Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models",
arXiv:2408.07990), with mergekit 0.1.5's ``sce`` semantics. Delta space.

For one tensor with task vectors δ_t = θ_t − θ₀ (t = 1..T), stacked, and the kept fraction
d (``select_topk``):

    Select:     v    = Var_t(δ_t)                (population variance over the experts, per entry)
                k    = ⌊nnz(v) · d⌋              (computed in float32, as mergekit)
                M    = the k entries of largest v (none when k = 0; everything when d ≥ 1)
                δ̂_t  = M ⊙ δ_t
    Calculate:  s_t  = mean(δ̂_t²)               (one coefficient per expert and tensor)
                c_t  = s_t / Σ_u s_u             (c_t = 1/T when Σ_u s_u < ``uniform_below`` or = 0)
    Erase:      γ    = +1 where Σ_t δ̂_t ≥ 0, else −1      (unweighted sign election; sign(0) = 0)
                A_t  = [sign(δ̂_t) = γ]
    θ*  = θ₀ + Σ_t c_t A_t δ̂_t / max(Σ_t c_t A_t, 1e-6)

The selection ranks entries by how much the experts *disagree* (variance), not by magnitude, and
its ``k`` counts only entries with nonzero variance, so with one expert (variance 0 everywhere)
any ``select_topk < 1`` selects nothing and gives θ₀, as in mergekit. Ties in the variance go
to the lower flat index (mergekit: ``torch.topk``'s order, arbitrary).

``uniform_below``: mergekit 0.1.5 (like the FuseChat reference code) falls back to uniform
coefficients when Σ_u mean(δ̂_u²) < 1e-6, an absolute threshold. Task vectors of real LLM
fine-tunes are often that small (an RMS of 5e-4 per expert is a mean square of 2.5e-7), and
then the Calculate step is a no-op: the result is the unweighted disjoint mean. The default
keeps mergekit's 1e-6; ``uniform_below=0`` makes the coefficients scale-free.

mergekit 0.1.5 has no ``weight`` (nor ``normalize``) for ``sce`` and silently ignores one: the
coefficients come from the task vectors. Here per-expert weights other than 1 are an error, and
the YAML keys are refused. ``int8_mask`` is accepted and has no effect.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import MergeMethod, TensorInputs, check_range, explain
from .kernels import abs_bits, kth_largest_bits
from .yaml_spec import Contract, MergekitSpec, YamlParam

#: mergekit 0.1.5's absolute threshold on Σ_t mean(δ_t²) below which the coefficients are uniform
SCE_UNIFORM_BELOW = 1e-6
#: the floor of the denominator Σ_t c_t A_t (mergekit's clamp)
SCE_DENOM_FLOOR = 1e-6


def sce_select_mask(stack: Tensor, density: float) -> Tensor:
    """The Select mask over one tensor's entries (``stack``: [T, ...] task vectors), boolean, the
    shape of one task vector: the k = ⌊nnz(Var_t) · density⌋ entries of largest variance."""
    shape = stack.shape[1:]
    if density >= 1.0:
        return torch.ones(shape, dtype=torch.bool, device=stack.device)
    var = torch.var(stack, dim=0, correction=0)
    # mergekit: int(count_nonzero(var) * density), an int64 tensor times a float, i.e. in float32
    k = int(torch.count_nonzero(var).to(torch.float32) * torch.tensor(density, dtype=torch.float32))
    if density <= 0.0 or k <= 0:
        return torch.zeros(shape, dtype=torch.bool, device=stack.device)
    bits = abs_bits(var).flatten()
    thr = kth_largest_bits(bits, k)
    mask = bits >= thr
    excess = int(torch.count_nonzero(mask)) - k
    if excess > 0:  # variances tied with the k-th largest: keep the first ones by index
        tied = torch.nonzero(bits == thr).flatten()
        mask[tied[tied.numel() - excess:]] = False
    return mask.view(shape)


def sce_coefficients(stack: Tensor, uniform_below: float = SCE_UNIFORM_BELOW) -> Tensor:
    """The Calculate step: c_t = mean(δ_t²) / Σ_u mean(δ_u²), shape [T] (uniform 1/T when the sum
    is below ``uniform_below`` or zero)."""
    s = stack.square().reshape(stack.shape[0], -1).mean(dim=1)
    total = float(s.sum())
    if total < uniform_below or total == 0.0:
        return torch.full_like(s, 1.0 / s.shape[0])
    return s / total


@dataclass(frozen=True, kw_only=True)
class Sce(MergeMethod):
    """SCE: select the highest-variance entries, weight experts by mean δ², erase minority signs.

    Attributes:
        select_topk: d in [0, 1], the fraction of the entries with nonzero variance across the
            experts that is kept (mergekit's default 1.0 keeps all; 0 keeps none, giving θ₀).
        uniform_below: the coefficients are uniform (1/T) when Σ_t mean(δ̂_t²) is below this
            (mergekit 0.1.5: 1e-6, the default); 0 keeps them proportional to mean(δ̂_t²) for any
            scale of the task vectors.
    """

    name = "sce"
    contract = Contract(identity={"select_topk": 1.0}, typical={"select_topk": 0.5})
    reference = "Wan et al. 2024, FuseChat: Knowledge Fusion of Chat Models (SCE, arXiv:2408.07990)"
    mergekit = MergekitSpec(
        "sce", {"int8_mask": YamlParam("bool", False, False), "select_topk": YamlParam("float", 1.0, False)},
        "required",
        lambda s, pm, n: ("sce", {"select_topk": s["select_topk"], "uniform_below": SCE_UNIFORM_BELOW}),
    )
    space = "delta"
    select_topk: float = 1.0
    uniform_below: float = SCE_UNIFORM_BELOW

    def __post_init__(self) -> None:
        check_range(self.name, "select_topk", self.select_topk, 0.0, 1.0,
                    hint="select_topk is the kept fraction of the entries; 1.0 keeps all")
        check_range(self.name, "uniform_below", self.uniform_below, 0.0, float("inf"),
                    hint="mergekit uses 1e-6; 0 disables the uniform fallback")

    def merge(self, inputs: TensorInputs) -> Tensor:
        if inputs.base is None:
            raise ConfigError(f"{self.name} needs a base model to compute task vectors; pass base=...")
        if any(w != 1.0 for w in inputs.weights):
            raise ConfigError(
                f"{self.name}: per-expert weights {inputs.weights} are not supported (SCE computes its own "
                "coefficients from the task vectors; mergekit has no 'weight' for sce); remove the weights"
            )
        base = inputs.base
        if not inputs.tensors or base.numel() == 0:
            return base.clone()
        stack = torch.stack(inputs.tensors, 0)
        inputs.tensors.clear()  # the stack is the only copy from here on
        if self.select_topk < 1.0:
            stack.mul_(sce_select_mask(stack, self.select_topk))
        gamma = torch.where(stack.sum(0) >= 0, 1.0, -1.0)
        agree = stack.sign() == gamma
        coef = sce_coefficients(stack, self.uniform_below)
        erased = coef.view(-1, *([1] * base.dim())) * agree
        fused = (stack * erased).sum(0) / erased.sum(0).clamp(min=SCE_DENOM_FLOOR)
        return base + fused


explain(Sce, math=__doc__)

__all__ = ["SCE_DENOM_FLOOR", "SCE_UNIFORM_BELOW", "Sce", "sce_coefficients", "sce_select_mask"]
