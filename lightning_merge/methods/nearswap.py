"""NearSwap (alchemonaut, "QuartetAnemoi-70B-t0.0001"), with mergekit 0.1.5's ``nearswap``
semantics. Weight space, elementwise, the base and exactly one expert.

With a = θ₀ (the base), b = θ₁ (the expert) and the distance t:

    w   = clamp(t / max(|a − b|, 1e-6), 0, 1)
    θ*  = w · b + (1 − w) · a

An entry where the two models are within t of each other takes the expert's value (w = 1); a
farther one moves from the base toward the expert by exactly t (w |b − a| = t). So, up to
rounding, θ* = a + clamp(b − a, −t, t): the base, with each entry pulled toward the expert by at
most t. Entries closer than 1e-6 use the denominator 1e-6 (mergekit's clamp), so for t < 1e-6
they move by the fraction t / 1e-6 of their difference. t = 0 gives the base; t ≥ max |b − a|
gives the expert.

mergekit 0.1.5 requires ``t`` and has no ``weight`` (it silently ignores one); here per-expert
weights other than 1 are an error. t < 0, which mergekit accepts and which gives the base, is
refused. A tensor the expert lacks is copied from the base.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..errors import ConfigError
from .base import MergeMethod, TensorInputs, check_range, explain
from .yaml_spec import REQUIRED, Contract, MergekitSpec, YamlParam

#: mergekit's floor on |a − b| in the denominator
NEARSWAP_FLOOR = 1e-6


def nearswap(t: float, a: Tensor, b: Tensor) -> Tensor:
    """NearSwap of base ``a`` toward expert ``b`` (same shape, float32)."""
    w = (t / (a - b).abs().clamp(min=NEARSWAP_FLOOR)).clamp(min=0.0, max=1.0)
    return w * b + (1 - w) * a


@dataclass(frozen=True, kw_only=True)
class Nearswap(MergeMethod):
    """NearSwap: θ* = w θ₁ + (1 − w) θ₀ with w = clamp(t / max(|θ₀ − θ₁|, 1e-6), 0, 1).

    Attributes:
        t: the distance t ≥ 0: entries within t of the expert take its value, the others move
            toward it by t (required in mergekit YAML; default 1e-4, the value of the model the
            method was introduced with).
    """

    name = "nearswap"
    elementwise = True
    contract = Contract(identity={"t": 1e6}, typical={"t": 0.05}, min_experts=1, max_experts=1)
    reference = "alchemonaut, QuartetAnemoi-70B-t0.0001 (https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001)"
    mergekit = MergekitSpec("nearswap", {"t": YamlParam("float", REQUIRED, False)}, "required",
                            lambda s, pm, n: ("nearswap", {"t": s["t"]}), 1, 1)
    space = "weight"
    t: float = 1e-4

    def __post_init__(self) -> None:
        check_range(self.name, "t", self.t, 0.0, float("inf"),
                    hint="t is the largest step of an entry toward the expert; 0 gives the base")

    def check_experts(self, n_experts: int) -> None:
        super().check_experts(n_experts)
        if n_experts != 1:
            raise ConfigError(
                f"{self.name}: moves the base toward exactly one expert, got {n_experts} experts; "
                "for more models use 'linear', 'ties' or 'sce'"
            )

    def merge(self, inputs: TensorInputs) -> Tensor:
        if inputs.base is None:
            raise ConfigError(f"{self.name} needs a base model; pass base=...")
        if any(w != 1.0 for w in inputs.weights):
            raise ConfigError(f"{self.name}: per-expert weights {inputs.weights} are not supported (mergekit "
                              "has no 'weight' for nearswap; t sets how far the base moves); remove the weights")
        if not inputs.tensors:
            return inputs.base.clone()
        if len(inputs.tensors) != 1:
            raise ConfigError(f"{self.name}: moves the base toward exactly one expert, "
                              f"got {len(inputs.tensors)} for tensor '{inputs.name}'")
        return nearswap(self.t, inputs.base, inputs.tensors[0])


explain(Nearswap, math=__doc__)

__all__ = ["NEARSWAP_FLOOR", "Nearswap", "nearswap"]
