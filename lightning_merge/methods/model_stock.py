"""Model Stock (Jang, Yun, Han 2024, "Model Stock: All we need is just a few fine-tuned models"),
with mergekit 0.1.5's ``model_stock`` semantics. Weight space.

For k ≥ 2 fine-tuned weights θ_1..θ_k of one tensor and the pre-trained θ₀, with task vectors
δ_t = θ_t − θ₀:

    cos  = mean over pairs a < b of clamp(⟨δ_a, δ_b⟩ / max(‖δ_a‖ ‖δ_b‖, 1e-6), −1, 1)
    t    = k · cos / (1 + (k − 1) · cos)          (t = 0 where |1 + (k − 1) cos| < 1e-6)
    θ*   = t · mean_t(θ_t) + (1 − t) · θ₀

With ``filter_wise=False`` (default) the tensor is one vector and t is one number; with
``filter_wise=True`` every filter gets its own t: ``filter_view="rows"`` (our default) takes each
output unit, the ``(shape[0], -1)`` view (a 1-D tensor is one row), as the paper's per-filter ratio;
``filter_view="last_dim"`` takes the vectors along the last dimension of the unflattened tensor, as
mergekit 0.1.5 computes it (its cosine reduces over dim −1). The two agree on 1-D and 2-D tensors
and differ on convolution kernels (e.g. a ViT patch embedding ``[64, 3, 4, 4]``: 64 filters, or
64·3·4 vectors of 4); a mergekit YAML gets ``"last_dim"``.

The average is unweighted, as in the paper and mergekit: per-expert weights must all be equal.
A tensor that fewer than two experts hold is copied from the base (mergekit's ``BASE_OR_SKIP``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import MergeMethod, TensorInputs
from .yaml_spec import Contract, MergekitSpec, YamlParam


def model_stock_ratio(deltas: Tensor) -> Tensor:
    """t per row of ``deltas`` ([k, rows, m] task vectors, k ≥ 2): shape [rows, 1]."""
    k = deltas.shape[0]
    norms = torch.linalg.vector_norm(deltas, dim=-1)
    cos_pairs = []
    for a in range(k):
        for b in range(a + 1, k):
            dot = (deltas[a] * deltas[b]).sum(-1)
            cos_pairs.append((dot / (norms[a] * norms[b]).clamp(min=1e-6)).clamp(-1.0, 1.0))
    cos = torch.stack(cos_pairs).mean(0).unsqueeze(-1)
    denom = 1.0 + (k - 1) * cos
    singular = denom.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denom), denom)
    return torch.where(singular, torch.zeros_like(cos), k * cos / safe)


@dataclass(frozen=True, kw_only=True)
class ModelStock(MergeMethod):
    """Model Stock: θ* = t · mean(θ_t) + (1 − t) · θ₀ with t from the task vectors' mean cosine.

    Attributes:
        filter_wise: one ratio t per filter instead of one per tensor.
        filter_view: what a filter is with ``filter_wise``: ``"rows"`` (each output unit, the
            ``(shape[0], -1)`` view; the paper) or ``"last_dim"`` (each vector along the last
            dimension; mergekit 0.1.5). The same on 1-D and 2-D tensors.
    """

    name = "model_stock"
    contract = Contract(min_experts=2)
    reference = 'Jang et al. 2024, Model Stock (arXiv:2403.19522)'
    mergekit = MergekitSpec("model_stock", {"filter_wise": YamlParam("bool", False, False)}, "required",
                            lambda s, pm, n: ("model_stock", {"filter_wise": s["filter_wise"],
                                                              "filter_view": "last_dim"}), 2)
    space = "weight"
    filter_wise: bool = False
    filter_view: Literal["rows", "last_dim"] = "rows"

    def __post_init__(self) -> None:
        if not isinstance(self.filter_wise, bool):
            raise ConfigError(f"{self.name}: parameter 'filter_wise' must be True or False, "
                              f"got {self.filter_wise!r}")
        if self.filter_view not in ("rows", "last_dim"):
            raise ConfigError(f"{self.name}: parameter 'filter_view' = {self.filter_view!r} is not one of "
                              "['rows', 'last_dim']")

    def check_experts(self, n_experts: int) -> None:
        super().check_experts(n_experts)
        if n_experts < 2:
            raise ConfigError(
                f"{self.name}: needs at least 2 fine-tuned experts besides the base, got {n_experts}"
            )

    def merge(self, inputs: TensorInputs) -> Tensor:
        if inputs.base is None:
            raise ConfigError(f"{self.name} needs the base (pre-trained) model; pass base=...")
        if len(set(inputs.weights)) > 1:
            raise ConfigError(
                f"{self.name}: per-expert weights {inputs.weights} are not supported (Model Stock "
                "averages the experts uniformly); give equal weights"
            )
        base = inputs.base
        if len(inputs.tensors) < 2:
            return base.clone()
        if self.filter_wise and base.dim() >= 1:
            if base.dim() == 1:
                w0 = base.reshape(1, -1)
            elif self.filter_view == "last_dim":
                w0 = base.reshape(-1, base.shape[-1])
            else:
                w0 = base.reshape(base.shape[0], -1)
        else:
            w0 = base.reshape(1, -1)
        ws = torch.stack([t.to(torch.float32).reshape(w0.shape) for t in inputs.tensors], 0)
        t = model_stock_ratio(ws - w0.unsqueeze(0))
        return (t * ws.mean(0) + (1.0 - t) * w0).reshape(base.shape)


__all__ = ["ModelStock", "model_stock_ratio"]
