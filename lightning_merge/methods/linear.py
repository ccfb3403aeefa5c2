"""Model soups and task arithmetic (spec §2).

* :class:`Linear` (mergekit ``linear``; Wortsman et al. 2022 model soup): θ* = Σ_t w_t θ_t / Σ_t w_t
  (uniform soup when all w_t = 1). Works on full weights and needs no base. With
  ``normalize=False`` it is the plain weighted sum Σ_t w_t θ_t.
* :class:`TaskArithmetic` (Ilharco et al. 2023): θ* = θ₀ + λ Σ_t w_t δ_t. With ``normalize=True``
  the sum is divided by Σ_t w_t (mergekit's option).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import DeltaMethod, MergeMethod, TensorInputs
from .kernels import weighted_mean, weighted_sum
from .yaml_spec import Contract, MergekitSpec, YamlParam, gta_params


@dataclass(frozen=True, kw_only=True)
class Linear(MergeMethod):
    """Weighted model soup: θ* = Σ_t w_t θ_t / Σ_t w_t (divisor guard |Σw| < 1e-8 → 1).

    Attributes:
        normalize: divide by Σ_t w_t (default True, as mergekit's ``linear``).
    """

    name = "linear"
    elementwise = True
    contract = Contract(identity={})
    reference = 'Wortsman et al. 2022, Model soups (arXiv:2203.05482)'
    mergekit = MergekitSpec("linear", {"weight": YamlParam("float", 1.0, True),
                                      "normalize": YamlParam("bool", True, False)},
                            "input", lambda s, pm, notes: ("linear", {"normalize": s["normalize"]}))
    space = "weight"
    requires_base = False
    normalize: bool = True

    def merge(self, inputs: TensorInputs) -> Tensor:
        if not inputs.tensors:
            if inputs.base is None:
                raise ValueError(f"linear: no model has tensor '{inputs.name}'")
            return inputs.base.clone()
        x, w = inputs.tensors, inputs.weights
        return weighted_mean(x, w) if self.normalize else weighted_sum(x, w)


@dataclass(frozen=True, kw_only=True)
class TaskArithmetic(DeltaMethod):
    """Task arithmetic: θ* = θ₀ + λ Σ_t w_t δ_t (÷ Σ_t w_t when ``normalize``).

    Attributes:
        lambda_: λ, the scale of the summed task vectors (the TA paper tunes it, typically 0.3-0.5).
        normalize: divide the weighted sum by Σ_t w_t.
    """

    name = "task_arithmetic"
    elementwise = True
    contract = Contract(identity={}, sums=True)
    reference = 'Ilharco et al. 2023, Editing models with task arithmetic (arXiv:2212.04089)'
    mergekit = MergekitSpec("task_arithmetic", gta_params(False, False), "required",
                            lambda s, pm, notes: _from_mergekit_ta(s, pm, notes))
    normalize: bool = False

    def combine(self, inputs: TensorInputs) -> Tensor:
        x, w = inputs.tensors, inputs.weights
        return weighted_mean(x, w) if self.normalize else weighted_sum(x, w)


def _from_mergekit_ta(s, pm, notes):
    if any(d != 1.0 for d in pm["density"]):
        notes.append("task_arithmetic: 'density' has no effect (mergekit has no sparsifier for "
                     "task_arithmetic); use ties, dare_linear or breadcrumbs to prune")
    if s["rescale"]:
        notes.append("task_arithmetic: 'rescale' has no effect without a sparsifier")
    return "task_arithmetic", {"lambda_": s["lambda"], "normalize": s["normalize"]}
