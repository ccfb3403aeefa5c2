"""Reinforced Agent Merging, RAM (Yuan et al. 2026, "Behavior Knowledge Merge in Reinforced Agentic
Models", arXiv:2601.13572), with mergekit 0.1.5's ``ram`` semantics. Delta space, elementwise.

RL fine-tuning changes few parameters, and different agents change mostly different ones; plain
averaging then divides every agent's *unique* update by T. RAM averages an entry only over the
experts that actually changed it. For one tensor, with task vectors δ_t = θ_t − θ₀ (t = 1..T) and
the threshold ε (``epsilon``):

    m_t = [|δ_t| > ε]                       expert t changed this entry
    c   = Σ_t m_t                           how many experts changed it
    Δ   = Σ_t m_t δ_t / max(c, 1)
    θ*  = θ₀ + Δ

so an entry changed by one expert only ("unique", c = 1) keeps that expert's full δ, an entry
changed by several ("shared", c ≥ 2) gets the mean over those experts, and an entry no expert
changed by more than ε (c = 0) stays θ₀: changes of at most ε are dropped, not averaged in.
It is the disjoint mean of the above-threshold entries, without sign election or weights.

mergekit 0.1.5 has no ``weight`` for ``ram`` (it silently ignores one); here per-expert weights
other than 1 are an error rather than silently unused. ε < 0 (which mergekit accepts, and which
makes every entry, zeros included, count as changed: the plain mean) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import MergeMethod, TensorInputs, check_range, explain
from .yaml_spec import Contract, MergekitSpec, YamlParam

#: mergekit 0.1.5's default threshold for "changed"
RAM_EPSILON = 1e-5


def ram_masks(deltas: list[Tensor], epsilon: float) -> tuple[list[Tensor], Tensor]:
    """Zero every entry of each δ_t with |δ_t| ≤ ε, in place; return (the masks m_t, the count c).

    ``deltas`` are overwritten with m_t ⊙ δ_t (the engine hands out tensors a method owns)."""
    masks: list[Tensor] = []
    count = torch.zeros_like(deltas[0], dtype=torch.int32)
    for d in deltas:
        m = d.abs() > epsilon
        d.mul_(m)
        count.add_(m)
        masks.append(m)
    return masks, count


def disjoint_mean(deltas: list[Tensor], count: Tensor) -> Tensor:
    """Σ_t δ_t / max(c, 1) for deltas already masked (zero where an expert did not change)."""
    total = torch.zeros_like(deltas[0])
    for d in deltas:
        total.add_(d)
    return total.div_(count.clamp(min=1))


def check_unit_weights(method: str, weights: list[float]) -> None:
    """RAM-style methods take no per-expert weights (mergekit has no ``weight`` for them)."""
    if any(w != 1.0 for w in weights):
        raise ConfigError(
            f"{method}: per-expert weights {weights} are not supported (the method averages each entry "
            "over the experts that changed it, unweighted, as mergekit does); remove the weights"
        )


def check_ram_epsilon(method: str, epsilon: float) -> None:
    check_range(method, "epsilon", epsilon, 0.0, float("inf"),
                hint="an entry counts as changed by an expert when |δ| > epsilon (mergekit: 1e-5)")


@dataclass(frozen=True, kw_only=True)
class Ram(MergeMethod):
    """RAM: θ* = θ₀ + Σ_t m_t δ_t / max(Σ_t m_t, 1) with m_t = [|δ_t| > ε].

    Attributes:
        epsilon: ε ≥ 0, the threshold above which |δ_t| counts as a change by expert t (changes of
            at most ε are dropped). mergekit's default 1e-5; ε = 0 keeps every nonzero entry.
    """

    name = "ram"
    elementwise = True
    contract = Contract(identity={"epsilon": 0.0}, typical={"epsilon": 0.05})
    reference = "Yuan et al. 2026, Behavior Knowledge Merge in Reinforced Agentic Models (RAM, arXiv:2601.13572)"
    mergekit = MergekitSpec("ram", {"epsilon": YamlParam("float", RAM_EPSILON, False)}, "required",
                            lambda s, pm, n: ("ram", {"epsilon": s["epsilon"]}))
    space = "delta"
    epsilon: float = RAM_EPSILON

    def __post_init__(self) -> None:
        check_ram_epsilon(self.name, self.epsilon)

    def merge(self, inputs: TensorInputs) -> Tensor:
        if inputs.base is None:
            raise ConfigError(f"{self.name} needs a base model to compute task vectors; pass base=...")
        check_unit_weights(self.name, inputs.weights)
        if not inputs.tensors:
            return inputs.base.clone()
        _, count = ram_masks(inputs.tensors, self.epsilon)
        return disjoint_mean(inputs.tensors, count).add_(inputs.base)


explain(Ram, math=__doc__)

__all__ = ["RAM_EPSILON", "Ram", "check_ram_epsilon", "check_unit_weights", "disjoint_mean", "ram_masks"]
