"""Karcher mean, mergekit 0.1.5's ``karcher``: the Riemannian centre of mass of the models' weights
on the unit hypersphere, rescaled to their mean norm (Karcher 1977; mergekit cites
arXiv:2603.04972). Weight space; each tensor is one vector.

For the inputs θ_1..θ_T with weights α_t = w_t / Σ_s w_s (all 1/T in mergekit, which has no
``weight`` for karcher) and τ = ``tol``:

    n_t = ‖θ_t‖,   u_t = θ_t / n_t                      (u_t = 0 where n_t = 0)
    V   = {t : n_t > τ};  none: the result is 0;  β_t = α_t / Σ_{s∈V} α_s for t ∈ V
    μ   = Σ_V β_t u_t / ‖Σ_V β_t u_t‖                  (u of the first t ∈ V when that norm < τ)
    repeat ``max_iter`` times (Riemannian gradient descent, step 1):
        c_t = clamp(⟨μ, u_t⟩, −1, 1),  ϑ_t = arccos c_t
        g   = Σ_{t∈V, ϑ_t ≥ τ} β_t ϑ_t / sin ϑ_t · (u_t − c_t μ)        (the log map's mean)
        stop when ‖g‖ < τ;  μ ← cos‖g‖ μ + sin‖g‖ g/‖g‖, renormalised when its norm > τ
    θ* = (Σ_t α_t n_t) · μ                                (α over all inputs, V or not)

One input is returned unchanged. In a mergekit YAML, ``base_model`` is not a base: as for
``linear``, when it is not one of ``models`` it becomes one more input, with weight 1 (mergekit
adds it to the inputs, and karcher averages all of them). In the Python API the base is used only
for the tensors no expert has.

``tol`` plays three roles, as in mergekit: inputs with norm ≤ τ are left out of the direction
(but not of the norm average), angles below τ contribute nothing, and a step below τ ends the
iteration; τ = 0, which mergekit accepts, is refused (an input whose direction is the mean's
gives ϑ/sin ϑ = 0/0, a NaN tensor). Per-expert weights (Python API) generalise mergekit's uniform α; they must be
non-negative and not all 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import MergeMethod, TensorInputs, check_range, explain
from .yaml_spec import Contract, MergekitSpec, YamlParam

#: mergekit 0.1.5's defaults
KARCHER_MAX_ITER = 10
KARCHER_TOL = 1e-5


def karcher_mean(xs: list[Tensor], alphas: list[float], *, max_iter: int = KARCHER_MAX_ITER,
                 tol: float = KARCHER_TOL) -> Tensor:
    """The weighted Karcher mean direction of ``xs`` scaled by Σ α_t ‖x_t‖ (``alphas`` sum to 1)."""
    if len(xs) == 1:
        return xs[0]
    norms = [torch.linalg.vector_norm(x) for x in xs]
    units = [torch.zeros_like(x) if float(n) == 0.0 else x / n for x, n in zip(xs, norms, strict=True)]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    total = sum(alphas[i] for i in valid)
    if total <= 0:
        raise ConfigError(f"karcher: the inputs with a nonzero norm all have weight 0 ({alphas}); "
                          "give at least one of them a positive weight")
    beta = [alphas[i] / total for i in valid]
    us = [units[i] for i in valid]

    mu = torch.zeros_like(us[0])
    for b, u in zip(beta, us, strict=True):
        mu += b * u
    mu_norm = torch.linalg.vector_norm(mu)
    mu = us[0].clone() if float(mu_norm) < tol else mu / mu_norm

    for _ in range(max_iter):
        grad = torch.zeros_like(mu)
        for b, u in zip(beta, us, strict=True):
            c = torch.clamp(torch.dot(mu.reshape(-1), u.reshape(-1)), -1.0, 1.0)
            angle = torch.arccos(c)
            if float(angle) < tol:
                continue
            grad += b * (angle / torch.sin(angle)) * (u - c * mu)
        step = torch.linalg.vector_norm(grad)
        if float(step) < tol:
            break
        mu = torch.cos(step) * mu + torch.sin(step) * (grad / step)
        n = torch.linalg.vector_norm(mu)
        if float(n) > tol:
            mu = mu / n

    scale = sum(a * n for a, n in zip(alphas, norms, strict=True))
    return scale * mu


@dataclass(frozen=True, kw_only=True)
class Karcher(MergeMethod):
    """Karcher mean: the models' weighted centre of mass on the unit sphere (fixed-point iteration),
    times their weighted mean norm; one vector per tensor.

    Attributes:
        max_iter: the most gradient steps (an integer ≥ 0; mergekit's default 10; 0 keeps the
            normalised weighted mean of the unit vectors).
        tol: τ > 0: the stopping step size, the smallest angle that counts and the smallest norm of
            an input that gives a direction (mergekit's default 1e-5).
    """

    name = "karcher"
    contract = Contract(identity={}, typical={"max_iter": 5})
    reference = "Karcher 1977, Riemannian center of mass; mergekit's karcher (arXiv:2603.04972)"
    mergekit = MergekitSpec(
        "karcher",
        {"max_iter": YamlParam("any", KARCHER_MAX_ITER, False),
         "tol": YamlParam("float", KARCHER_TOL, False)},
        "input",
        lambda s, pm, notes: ("karcher", {"max_iter": _as_int(s["max_iter"]), "tol": s["tol"]}),
    )
    space = "weight"
    requires_base = False
    allow_negative_weights = False
    max_iter: int = KARCHER_MAX_ITER
    tol: float = KARCHER_TOL

    def __post_init__(self) -> None:
        if type(self.max_iter) is not int or self.max_iter < 0:
            raise ConfigError(f"{self.name}: parameter 'max_iter' must be an integer ≥ 0 (mergekit's default "
                              f"10), got {self.max_iter!r}")
        check_range(self.name, "tol", self.tol, 0.0, math.inf, lo_open=True,
                    hint="tol is the stopping step size and the smallest norm and angle that count (1e-5); "
                         "tol = 0 divides 0 by 0 where an input's direction is the mean's")

    def merge(self, inputs: TensorInputs) -> Tensor:
        xs = inputs.tensors
        single = inputs.single_input(self.name)
        if single is not None:
            return single
        total = sum(inputs.weights)
        if total <= 0:
            raise ConfigError(f"{self.name}: the weights {inputs.weights} of tensor '{inputs.name}' sum to "
                              "0; give at least one model a positive weight")
        alphas = [w / total for w in inputs.weights]
        return karcher_mean(xs, alphas, max_iter=self.max_iter, tol=self.tol)


def _as_int(value: object) -> object:
    """A YAML number that is an integer (10, 10.0, "10") as an int, like mergekit's pydantic int;
    anything else is left for :class:`Karcher` to refuse."""
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return value
    return value


explain(Karcher, math=__doc__)

__all__ = ["KARCHER_MAX_ITER", "KARCHER_TOL", "Karcher", "karcher_mean"]
