"""Model Breadcrumbs (Davari & Belilovsky 2023), with mergekit 0.1.5's semantics.

Per expert and tensor (n entries), rank |δ| in descending order (stable: of two equal magnitudes
the lower index counts as the larger) and keep a band of k = ⌊d·n⌋ entries below the largest
outliers:

    n_top = ⌊γ·n⌋                       the outliers removed (``gamma``)
    s     = min(n_top, n − k)           outlier removal shrinks so that k entries remain
    keep  = ranks s .. s + k − 1         everything else (outliers and the small tail) is zeroed

which is mergekit's ``magnitude_outliers`` (ascending ranks [n − k − s, n − s)). ``density >= 1``
returns δ unchanged (whatever γ). ``rescale`` ``"l1" | "l2" | "linf"`` then matches the norm of
the whole tensor (mergekit's ``rescale: true`` is ``"l1"``); ``"none"`` (default) does not rescale.

* :class:`Breadcrumbs` (mergekit ``breadcrumbs``): Δ = Σ_t w_t δ̂_t (÷ Σ_t w_t with
  ``normalize``, divisor guard |Σ w| < 1e-8 → 1); θ* = θ₀ + λ Δ.
* :class:`BreadcrumbsTies` (mergekit ``breadcrumbs_ties``): γ_sign = sign(Σ_t w_t δ̂_t) (S = 0 → +1),
  Δ = Σ_t A_t w_t δ̂_t, or ÷ Σ_t A_t w_t with ``normalize``; θ* = θ₀ + λ Δ.

Defaults are mergekit's: ``density=1.0`` (no pruning until set), ``gamma=0.01``,
``normalize=False``, no rescale. The paper's masks drop the bottom β and top γ percentiles of
|δ|: density = 1 − β − γ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .base import DeltaMethod, PerExpert, TensorInputs, check_choice, check_range, explain
from .kernels import ZeroSign, elect_and_fuse, norm_rescale, weighted_mean, weighted_sum
from .yaml_spec import Contract, MergekitSpec, YamlParam, collapse, gta_params, rescale_mode

NormRescale = Literal["none", "l1", "l2", "linf"]


def breadcrumbs_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Boolean keep mask: the k = ⌊density·n⌋ largest |δ| after removing ⌊gamma·n⌋ top outliers.

    Outlier removal is reduced to n − k when ⌊gamma·n⌋ + k > n (mergekit). ``density >= 1`` keeps
    everything.
    """
    n = delta.numel()
    if density >= 1.0:
        return torch.ones_like(delta, dtype=torch.bool)
    k = max(0, int(density * n))
    skip = min(int(gamma * n), n - k)
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    if k > 0:
        order = torch.sort(delta.detach().abs().flatten(), descending=True, stable=True).indices
        mask[order[skip : skip + k]] = True
    return mask.view_as(delta)


def breadcrumbs_prune(delta: Tensor, density: float, gamma: float, rescale: NormRescale = "none") -> Tensor:
    """δ̂ = mask ⊙ δ (:func:`breadcrumbs_mask`), norm-matched to δ unless ``rescale="none"``."""
    if density >= 1.0:
        return delta
    kept = torch.where(breadcrumbs_mask(delta, density, gamma), delta, torch.zeros_like(delta))
    return kept if rescale == "none" else norm_rescale(kept, delta, rescale)


@dataclass(frozen=True, kw_only=True)
class _Breadcrumbs(DeltaMethod):
    """Shared hyperparameters.

    Attributes:
        density: d, the kept fraction of each task vector, per expert (mergekit default 1.0).
        gamma: γ, the fraction of largest-|δ| outliers removed, per expert (mergekit default 0.01).
        rescale: ``"none"`` (default), ``"l1"`` (mergekit ``rescale: true``), ``"l2"`` or ``"linf"``.
        normalize: divide by the (elected) weight sum (default False, as mergekit).
    """

    per_expert_params = ("density", "gamma")
    density: PerExpert = 1.0
    gamma: PerExpert = 0.01
    rescale: NormRescale = "none"
    normalize: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self.name, "density", self.density, 0.0, 1.0, lo_open=True,
                    hint="density is the kept fraction; 1.0 disables the pruning")
        check_range(self.name, "gamma", self.gamma, 0.0, 1.0, hi_open=True,
                    hint="gamma is the fraction of largest-magnitude outliers removed")
        check_choice(self.name, "rescale", self.rescale, ("none", "l1", "l2", "linf"))

    def pruned(self, inputs: TensorInputs) -> list[Tensor]:
        return [
            breadcrumbs_prune(d, inputs.per_expert(self.density, i), inputs.per_expert(self.gamma, i),
                              self.rescale)
            for i, d in enumerate(inputs.tensors)
        ]


@dataclass(frozen=True, kw_only=True)
class Breadcrumbs(_Breadcrumbs):
    """Breadcrumbs masks then task arithmetic: θ* = θ₀ + λ Σ_t w_t δ̂_t (÷ Σ_t w_t with ``normalize``)."""

    name = "breadcrumbs"
    contract = Contract(identity={"density": 1.0, "gamma": 0.0}, typical={"density": 0.6, "gamma": 0.1})
    reference = 'Davari & Belilovsky 2023, Model Breadcrumbs (arXiv:2312.06795)'
    mergekit = MergekitSpec("breadcrumbs", gta_params(False, False, {"gamma": YamlParam("float", 0.01, True)}),
                            "required", lambda s, pm, n: _from_mergekit("breadcrumbs", s, pm))

    def combine(self, inputs: TensorInputs) -> Tensor:
        x = self.pruned(inputs)
        return weighted_mean(x, inputs.weights) if self.normalize else weighted_sum(x, inputs.weights)


@dataclass(frozen=True, kw_only=True)
class BreadcrumbsTies(_Breadcrumbs):
    """Breadcrumbs masks, then TIES sign election: θ* = θ₀ + λ Σ_t A_t w_t δ̂_t (÷ Σ_t A_t w_t).

    Attributes:
        zero_sign: where Σ w_t δ̂_t = 0: ``"positive"`` (+1, mergekit) or ``"majority"``.
    """

    name = "breadcrumbs_ties"
    contract = Contract(identity={"density": 1.0, "gamma": 0.0}, typical={"density": 0.6, "gamma": 0.1})
    reference = 'Davari & Belilovsky 2023, Model Breadcrumbs (arXiv:2312.06795)'
    mergekit = MergekitSpec("breadcrumbs_ties", gta_params(False, False, {"gamma": YamlParam("float", 0.01, True)}),
                            "required", lambda s, pm, n: _from_mergekit("breadcrumbs_ties", s, pm))
    allow_negative_weights = False
    zero_sign: ZeroSign = "positive"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.name, "zero_sign", self.zero_sign, ("positive", "majority"))

    def combine(self, inputs: TensorInputs) -> Tensor:
        return elect_and_fuse(self.pruned(inputs), inputs.weights, normalize=self.normalize,
                              zero_sign=self.zero_sign, consume=True)


__all__ = ["Breadcrumbs", "BreadcrumbsTies", "breadcrumbs_mask", "breadcrumbs_prune"]


def _from_mergekit(name, s, pm):
    kw = {"density": collapse(pm["density"]), "gamma": collapse(pm["gamma"]), "rescale": rescale_mode(s),
          "normalize": s["normalize"], "lambda_": s["lambda"]}
    if name == "breadcrumbs_ties":
        kw["zero_sign"] = "positive"
    return name, kw


explain(Breadcrumbs, BreadcrumbsTies, math=__doc__)
