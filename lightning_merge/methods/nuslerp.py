"""NuSLERP, mergekit 0.1.5's ``nuslerp``: spherical interpolation of exactly two experts, set by
their weights, of the task vectors when there is a base and of the full weights otherwise.

With the two experts' weights w₁, w₂ the interpolation factor is

    t = w₂ / (w₁ + w₂)            (t = 0.5 when |w₁ + w₂| < 1e-6; t outside [0, 1] extrapolates)

and the inputs are a = δ₁, b = δ₂ (task vectors, ``task_vectors=True`` with a base: θ* = θ₀ +
slerp(a, b)) or a = θ₁, b = θ₂ (full weights: θ* = slerp(a, b)). ``dim`` chooses the vectors: None
(mergekit ``nuslerp_flatten: true``, its default) takes the whole tensor as one vector; −1
(``nuslerp_flatten: false``) each slice along the last dimension (each row θ[i, :] of a matrix);
0 (``nuslerp_flatten: false, nuslerp_row_wise: true``) each slice along the first dimension (each
column θ[:, j] of a matrix; mergekit calls these "row" vectors). For every vector pair:

    â = a / max(‖a‖, 1e-7),  b̂ = b / max(‖b‖, 1e-7),  c = clamp(⟨â, b̂⟩, −1, 1)
    if 1 − c² ≤ 1e-16 (colinear, antipodal included):   (1 − t) a + t b
    else:  Ω = arccos c,   (sin((1 − t) Ω) a + sin(t Ω) b) / sin Ω

The colinear test holds in float32 only when c rounds to ±1: nearly antipodal vectors take the
spherical branch (whose value tends to a finite limit as Ω → π, not to the linear one).
The coefficients multiply the unnormalised vectors, so t = 0 gives a and t = 1 gives b. A zero
vector has c = 0, so Ω = π/2: slerp(0, b) = sin(t π/2) b (as in mergekit). A 0- or 1-dimensional
tensor is one vector whatever ``dim`` says.

Tensors that only one expert has are taken from that expert (mergekit copies a tensor that only
one input has; with a base and one expert it stops with an error), tensors no expert has from the
base.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import MergeMethod, TensorInputs, explain
from .yaml_spec import Contract, MergekitSpec, YamlParam

#: mergekit's normalisation floor and colinearity threshold (1 − c² ≤ COLINEAR_EPS²)
NORM_FLOOR = 1e-7
COLINEAR_EPS = 1e-8


def nuslerp_t(weights: list[float]) -> float:
    """The interpolation factor t = w₂ / (w₁ + w₂) of two weights (0.5 when the sum is ~0)."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def slerp_vectors(t: float, a: Tensor, b: Tensor, dim: int | None = None) -> Tensor:
    """SLERP of ``a`` and ``b`` (same shape) per vector: the whole tensor (``dim=None``) or each
    slice along ``dim`` (−1 or 0); the result has their shape and dtype."""
    shape = a.shape
    if dim is None or a.dim() <= 1:
        x, y = a.reshape(-1), b.reshape(-1)
    elif dim == 0:
        x, y = a.transpose(0, -1), b.transpose(0, -1)
    else:
        x, y = a, b
    xu = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    yu = y / torch.linalg.vector_norm(y, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    cos = (xu * yu).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    colinear = (1.0 - cos * cos) <= COLINEAR_EPS**2
    omega = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    spherical = (torch.sin((1.0 - t) * omega) * x + torch.sin(t * omega) * y) / torch.sin(omega)
    out = torch.where(colinear, (1.0 - t) * x + t * y, spherical)
    if dim == 0 and a.dim() > 1:
        out = out.transpose(0, -1)
    return out.reshape(shape)


@dataclass(frozen=True, kw_only=True)
class NuSlerp(MergeMethod):
    """NuSLERP: SLERP of two experts with t = w₂ / (w₁ + w₂), of their task vectors when a base is
    given (θ* = θ₀ + slerp(δ₁, δ₂)), else of their weights; per tensor, row or column.

    Attributes:
        dim: None: each tensor is one vector (mergekit's default ``nuslerp_flatten: true``); −1:
            each slice along the last dimension, i.e. each row of a matrix (``nuslerp_flatten:
            false``); 0: each slice along the first dimension, i.e. each column of a matrix
            (``nuslerp_flatten: false`` with ``nuslerp_row_wise: true``).
        task_vectors: with a base, interpolate the task vectors θ_t − θ₀ and add θ₀ back (what
            mergekit does when the YAML gives ``base_model``). False: interpolate the full weights;
            the base then only supplies the tensors no expert has. Without a base the weights are
            interpolated either way.
    """

    name = "nuslerp"
    contract = Contract(typical={"dim": -1}, min_experts=2, max_experts=2)
    reference = "mergekit's nuslerp (Goddard et al. 2024, Arcee's MergeKit, arXiv:2403.13257)"
    mergekit = MergekitSpec(
        "nuslerp",
        {"weight": YamlParam("float", 1.0, True),  # mergekit: required; we default to 1.0
         "nuslerp_row_wise": YamlParam("bool", False, False),
         "nuslerp_flatten": YamlParam("bool", True, False)},
        "optional",
        lambda s, pm, notes: ("nuslerp", {"dim": None if s["nuslerp_flatten"]
                                          else (0 if s["nuslerp_row_wise"] else -1)}),
        2, 2, base_flag="task_vectors",
    )
    space = "weight"
    requires_base = False
    dim: int | None = None
    task_vectors: bool = True

    def __post_init__(self) -> None:
        if self.dim is not None and (type(self.dim) is not int or self.dim not in (-1, 0)):
            raise ConfigError(f"{self.name}: parameter 'dim' must be None (whole tensor), -1 (rows) or 0 "
                              f"(columns), got {self.dim!r}")
        if not isinstance(self.task_vectors, bool):
            raise ConfigError(f"{self.name}: parameter 'task_vectors' must be True or False, "
                              f"got {self.task_vectors!r}")

    def check_experts(self, n_experts: int) -> None:
        super().check_experts(n_experts)
        if n_experts != 2:
            raise ConfigError(
                f"{self.name}: interpolates exactly two experts, got {n_experts}; for one expert and the "
                "base use 'slerp', for more experts 'multislerp' or 'karcher'"
            )

    def merge(self, inputs: TensorInputs) -> Tensor:
        base, xs = inputs.base, inputs.tensors
        single = inputs.single_input(self.name)
        if single is not None:
            return single
        if len(xs) != 2:
            raise ConfigError(f"{self.name}: interpolates exactly two experts, got {len(xs)} for tensor "
                              f"'{inputs.name}'")
        t = nuslerp_t(inputs.weights)
        if base is not None and self.task_vectors:
            return base + slerp_vectors(t, xs[0] - base, xs[1] - base, self.dim)
        return slerp_vectors(t, xs[0], xs[1], self.dim)


explain(NuSlerp, math=__doc__)

__all__ = ["NuSlerp", "nuslerp_t", "slerp_vectors"]
