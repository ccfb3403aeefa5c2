"""RAM+ with tensor-local rescaling (Yuan et al. 2026, arXiv:2601.13572), with mergekit 0.1.5's
``ramplus_tl`` semantics. Delta space; not elementwise (each expert's factor counts over the tensor).

RAM (:mod:`lightning_merge.methods.ram`) keeps an entry changed by one expert only at that
expert's full δ, and averages shared entries over the experts that changed them. RAM+ also scales
up the unique entries of an expert whose changes overlap a lot with the others', to make up for
the dilution its shared entries suffer. For one tensor, with δ_t = θ_t − θ₀ and the threshold ε:

    m_t = [|δ_t| > ε],   c = Σ_t m_t
    S_t = #{entries: m_t ∧ c ≥ 2}            expert t's shared entries
    U_t = #{entries: m_t ∧ c = 1}            expert t's unique entries
    ρ_t = S_t / max(U_t, ε)                  overlap ratio
    λ_t = 1 + r · clamp(ρ_t, 0, α)
    Δ   = λ_t δ_t                            where c = 1 and t is the one expert that changed it
          Σ_t m_t δ_t / c                    where c ≥ 2
          0                                  where c = 0
    θ*  = θ₀ + Δ

"Tensor-local" (mergekit's ``_tl``): S_t and U_t are counted over this tensor only, so λ_t can
differ between tensors. r = 0 is RAM exactly. λ_t ranges over [1, 1 + r·α].

Where mergekit 0.1.5 differs: with ε = 0, an expert that changed no entry of a tensor
(S_t = U_t = 0, e.g. a frozen layer) gets ρ_t = 0/0 = NaN in mergekit, and the NaN spreads to
every entry of the merged tensor (0 · NaN). Here λ_t = 1 for an expert without unique entries,
which only matters there (λ_t multiplies its unique entries only): the result is mergekit's
wherever mergekit's is finite. mergekit has no ``weight`` for this method: weights other than 1
are an error here. Negative ε, r or α (mergekit accepts them; α < 0 makes torch's clamp return α)
are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import MergeMethod, TensorInputs, check_range, explain
from .ram import RAM_EPSILON, check_ram_epsilon, check_unit_weights, disjoint_mean, ram_masks
from .yaml_spec import Contract, MergekitSpec, YamlParam


def overlap_scale(shared: int, unique: int, r: float, alpha: float, epsilon: float) -> float:
    """λ = 1 + r · clamp(S / max(U, ε), 0, α); 1 for an expert without unique entries."""
    if unique == 0:
        return 1.0
    rho = shared / max(unique, epsilon)
    return 1.0 + r * min(max(rho, 0.0), alpha)


@dataclass(frozen=True, kw_only=True)
class RamPlusTL(MergeMethod):
    """RAM+ (tensor-local): RAM with each expert's unique entries scaled by λ_t = 1 + r·clamp(ρ_t, 0, α).

    Attributes:
        r: the rescaling strength r ≥ 0 (mergekit's default 0.1; 0 gives RAM).
        alpha: α ≥ 0, the cap on the overlap ratio ρ_t (mergekit's default 0.2), so λ_t ≤ 1 + r·α.
        epsilon: ε ≥ 0, the threshold above which |δ_t| counts as a change (mergekit's default
            1e-5); also the floor of U_t in ρ_t's denominator.
    """

    name = "ramplus_tl"
    contract = Contract(identity={"epsilon": 0.0}, typical={"epsilon": 0.05, "r": 0.5, "alpha": 0.5})
    reference = ("Yuan et al. 2026, Behavior Knowledge Merge in Reinforced Agentic Models (RAM+, "
                 "arXiv:2601.13572); mergekit's tensor-local variant")
    mergekit = MergekitSpec(
        "ramplus_tl",
        {"r": YamlParam("float", 0.1, False), "alpha": YamlParam("float", 0.2, False),
         "epsilon": YamlParam("float", RAM_EPSILON, False)},
        "required",
        lambda s, pm, n: ("ramplus_tl", {"r": s["r"], "alpha": s["alpha"], "epsilon": s["epsilon"]}),
    )
    space = "delta"
    r: float = 0.1
    alpha: float = 0.2
    epsilon: float = RAM_EPSILON

    def __post_init__(self) -> None:
        check_range(self.name, "r", self.r, 0.0, float("inf"),
                    hint="r scales up unique entries (λ = 1 + r·clamp(ρ, 0, alpha)); r = 0 is plain ram")
        check_range(self.name, "alpha", self.alpha, 0.0, float("inf"),
                    hint="alpha caps the overlap ratio ρ in λ = 1 + r·clamp(ρ, 0, alpha)")
        check_ram_epsilon(self.name, self.epsilon)

    def scales(self, masks: list[Tensor], count: Tensor) -> list[float]:
        """λ_t of every expert from its shared and unique counts over this tensor."""
        unique, shared = count == 1, count > 1
        return [overlap_scale(int((m & shared).sum()), int((m & unique).sum()), self.r, self.alpha, self.epsilon)
                for m in masks]

    def merge(self, inputs: TensorInputs) -> Tensor:
        if inputs.base is None:
            raise ConfigError(f"{self.name} needs a base model to compute task vectors; pass base=...")
        check_unit_weights(self.name, inputs.weights)
        if not inputs.tensors:
            return inputs.base.clone()
        masks, count = ram_masks(inputs.tensors, self.epsilon)
        lambdas = self.scales(masks, count)
        out = disjoint_mean(inputs.tensors, count)  # a unique entry holds its one expert's δ here
        factor = torch.ones_like(out)
        unique = count == 1
        for m, lam in zip(masks, lambdas, strict=True):
            if lam != 1.0:
                factor.masked_fill_(m & unique, lam)
        return out.mul_(factor).add_(inputs.base)


explain(RamPlusTL, math=__doc__)

__all__ = ["RamPlusTL", "overlap_scale"]
