"""Spherical linear interpolation between the base and one expert (mergekit 0.1.5 ``slerp``).
Weight space; the whole tensor is one vector.

With v₀ = θ₀ (base) and v₁ = θ₁ (the expert), both flattened:

    dot  = clamp(⟨v₀/‖v₀‖, v₁/‖v₁‖⟩, −1, 1)          (a norm ≤ 1e-8 is replaced by 1)
    if |dot| > dot_threshold:  θ* = (1 − t) v₀ + t v₁             (near-colinear: linear fallback)
    else:  Ω = arccos(dot),   θ* = sin((1 − t) Ω)/sin Ω · v₀ + sin(t Ω)/sin Ω · v₁

The coefficients multiply the original (unnormalised) vectors, so t = 0 gives θ₀ and t = 1 gives
θ₁ exactly. ``dot_threshold`` defaults to mergekit's DOT_THRESHOLD = 0.9995. A tensor the expert
lacks is copied from the base.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import MergeMethod, TensorInputs, check_range
from .yaml_spec import REQUIRED, Contract, MergekitSpec, YamlParam

DOT_THRESHOLD = 0.9995


def slerp(
    t: float, v0: Tensor, v1: Tensor, dot_threshold: float = DOT_THRESHOLD, eps: float = 1e-8
) -> Tensor:
    """SLERP of two same-shape tensors, each taken as one vector (float32, or float64 inputs)."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(-1).to(dtype)
    b = v1.reshape(-1).to(dtype)
    if a.numel() == 0:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    na = torch.linalg.vector_norm(a)
    nb = torch.linalg.vector_norm(b)
    na = torch.where(na > eps, na, torch.ones_like(na))
    nb = torch.where(nb > eps, nb, torch.ones_like(nb))
    dot = float(((a / na) * (b / nb)).sum().clamp(-1.0, 1.0))
    if abs(dot) > dot_threshold:
        ca, cb = 1.0 - t, t
    else:
        theta = torch.acos(torch.tensor(dot, dtype=dtype))
        sin_theta = torch.sin(theta)
        ca = torch.sin((1.0 - t) * theta) / sin_theta
        cb = torch.sin(t * theta) / sin_theta
    return (ca * a + cb * b).reshape(v0.shape)


@dataclass(frozen=True, kw_only=True)
class Slerp(MergeMethod):
    """SLERP between the base (t = 0) and exactly one expert (t = 1).

    Attributes:
        t: the interpolation factor in [0, 1].
        dot_threshold: above this |cos| the vectors count as colinear and plain linear
            interpolation is used (mergekit's DOT_THRESHOLD, 0.9995).
    """

    name = "slerp"
    contract = Contract(typical={"t": 0.3}, min_experts=1, max_experts=1)
    reference = "Shoemake 1985 (spherical interpolation); mergekit's slerp"
    mergekit = MergekitSpec("slerp", {"t": YamlParam("float", REQUIRED, False)}, "required",
                            lambda s, pm, n: ("slerp", {"t": s["t"]}), 1, 1)
    space = "weight"
    t: float = 0.5
    dot_threshold: float = DOT_THRESHOLD

    def __post_init__(self) -> None:
        check_range(self.name, "t", self.t, 0.0, 1.0, hint="t = 0 is the base, t = 1 the expert")
        check_range(self.name, "dot_threshold", self.dot_threshold, 0.0, 1.0)

    def check_experts(self, n_experts: int) -> None:
        super().check_experts(n_experts)
        if n_experts != 1:
            raise ConfigError(
                f"{self.name}: interpolates the base and exactly one expert, got {n_experts} experts; "
                "for more models use 'linear' or 'model_stock'"
            )

    def merge(self, inputs: TensorInputs) -> Tensor:
        if inputs.base is None:
            raise ConfigError(f"{self.name} needs a base model (the t = 0 end); pass base=...")
        if not inputs.tensors:
            return inputs.base.clone()
        if len(inputs.tensors) != 1:
            raise ConfigError(f"{self.name}: interpolates the base and exactly one expert, "
                              f"got {len(inputs.tensors)} for tensor '{inputs.name}'")
        return slerp(self.t, inputs.base, inputs.tensors[0], self.dot_threshold).to(torch.float32)


__all__ = ["DOT_THRESHOLD", "Slerp", "slerp"]
