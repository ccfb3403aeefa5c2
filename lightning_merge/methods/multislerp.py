"""Multi-SLERP, mergekit 0.1.5's ``multislerp``: a weighted barycentre of any number of experts on
the hypersphere (C. Goddard, "Multi-SLERP", https://goddard.blog/posts/multislerp-wow-what-a-cool-idea).

Each tensor is one vector. The inputs are x_t = δ_t = θ_t − θ₀ (task vectors; ``task_vectors=True``
with a base, θ* = θ₀ + result) or x_t = θ_t (full weights, θ* = result). With the weights w_t
(divided by Σ_t w_t when ``normalize_weights``) and ε = ``eps``:

    n_t = ‖x_t‖,   u_t = x_t / (n_t + ε)                    points on the unit sphere
    m   = Σ_t w_t u_t;  if ‖m‖ < ε: Σ_t w_t x_t  (fallback, below);  else m̂ = m / ‖m‖
    v_t = u_t − ⟨u_t, m̂⟩ m̂                                 projections onto the tangent plane at m̂
    v   = Σ_t w_t v_t,   r = ‖v‖ + ε
    result = (cos(r) m̂ + sin(r) / r · v) · Σ_t w_t n_t      exponential map back, mean norm

One expert is returned unchanged (its weight is not applied, as in mergekit).

Fallback. When the weighted mean of the unit vectors vanishes (every task vector zero, e.g. a
tensor no expert changed, or vectors such as a, −a with equal weights) mergekit 0.1.5 returns the
linear combination Σ_t w_t x_t for two experts and raises an error for three or more. Here the
linear combination is used for any number of experts, so unchanged tensors merge to the base
instead of stopping the merge; two experts match mergekit exactly.

With ``normalize_weights`` the weights must not sum to 0 (mergekit divides by 0 and writes NaN);
``eps`` must be > 0 (mergekit accepts 0, which makes a zero task vector 0/0, a NaN tensor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import MergeMethod, TensorInputs, check_range, explain
from .yaml_spec import Contract, MergekitSpec, YamlParam

#: mergekit 0.1.5's default ``eps``
MULTISLERP_EPS = 1e-8


def multislerp(xs: list[Tensor], weights: list[float], *, normalize_weights: bool = True,
               eps: float = MULTISLERP_EPS) -> Tensor:
    """The Multi-SLERP barycentre of same-shape tensors ``xs`` (each taken as one vector)."""
    if len(xs) == 1:
        return xs[0]
    stack = torch.stack(xs, 0)
    flat = stack.reshape(len(xs), -1)
    w = torch.tensor(weights, dtype=stack.dtype, device=stack.device)
    if normalize_weights:
        w = w / w.sum()
    col = w.reshape(-1, 1)
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * col).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if bool(mean_norm < eps):
        out = stack[0] * w[0]
        for i in range(1, len(xs)):
            out = out + stack[i] * w[i]
        return out
    mean = mean / mean_norm
    tangent = units - (units * mean).sum(-1, keepdim=True) * mean
    v = (tangent * col).sum(0)
    r = torch.linalg.vector_norm(v) + eps
    out = mean * torch.cos(r) + v * (torch.sin(r) / r)
    return (out * (norms.squeeze(-1) * w).sum()).reshape(stack.shape[1:])


@dataclass(frozen=True, kw_only=True)
class MultiSlerp(MergeMethod):
    """Multi-SLERP: the weighted spherical barycentre of the experts' task vectors (with a base) or
    weights, scaled to their weighted mean norm; one vector per tensor.

    Attributes:
        normalize_weights: divide the weights by their sum first (mergekit's default True).
        eps: ε > 0, the guard added to the norms and the threshold of the fallback (mergekit's
            default 1e-8).
        task_vectors: with a base, average the task vectors θ_t − θ₀ and add θ₀ back (what mergekit
            does when the YAML gives ``base_model``). False: average the full weights; the base then
            only supplies the tensors no expert has. Without a base the weights are averaged either
            way.
    """

    name = "multislerp"
    contract = Contract(identity={}, typical={"normalize_weights": True})
    reference = "Goddard 2025, Multi-SLERP (goddard.blog, multislerp-wow-what-a-cool-idea); mergekit's multislerp"
    mergekit = MergekitSpec(
        "multislerp",
        {"weight": YamlParam("float", 1.0, True),  # mergekit: required; we default to 1.0
         "normalize_weights": YamlParam("bool", True, False),
         "eps": YamlParam("float", MULTISLERP_EPS, False)},
        "optional",
        lambda s, pm, notes: ("multislerp", {"normalize_weights": s["normalize_weights"], "eps": s["eps"]}),
        1, base_flag="task_vectors",
    )
    space = "weight"
    requires_base = False
    normalize_weights: bool = True
    eps: float = MULTISLERP_EPS
    task_vectors: bool = True

    def __post_init__(self) -> None:
        for pname in ("normalize_weights", "task_vectors"):
            if not isinstance(getattr(self, pname), bool):
                raise ConfigError(f"{self.name}: parameter '{pname}' must be True or False, "
                                  f"got {getattr(self, pname)!r}")
        check_range(self.name, "eps", self.eps, 0.0, math.inf, lo_open=True,
                    hint="eps guards the division by each norm (mergekit's default 1e-8)")

    def merge(self, inputs: TensorInputs) -> Tensor:
        base, xs = inputs.base, inputs.tensors
        single = inputs.single_input(self.name)
        if single is not None:
            return single
        if self.normalize_weights and abs(sum(inputs.weights)) < 1e-12:
            raise ConfigError(
                f"{self.name}: the weights {inputs.weights} of tensor '{inputs.name}' sum to 0, so "
                "normalize_weights divides by 0; change a 'weight' or set normalize_weights: false"
            )
        relative = base is not None and self.task_vectors
        if relative:
            xs = [x.sub_(base) for x in xs]
        out = multislerp(xs, inputs.weights, normalize_weights=self.normalize_weights, eps=self.eps)
        return out + base if relative else out


explain(MultiSlerp, math=__doc__)

__all__ = ["MULTISLERP_EPS", "MultiSlerp", "multislerp"]
