"""Sens-Merging (Liu et al., Findings of ACL 2025, arXiv 2502.12420): per-layer, per-expert
weights from parameter sensitivity and cross-task logit alignment, for task arithmetic, TIES,
DARE or any method of the task-arithmetic family.

Only the abstract and public summaries of the method were available (no reference code), so the
formulas below are this library's reading of it; every choice is a parameter or stated here.

1. Sensitivity (calibration pass, per expert i on batches b of its own task i): the first-order
   Taylor estimate of the loss change when a parameter is zeroed, |θ ⊙ ∇_θ L_i(b)|, taken at
   θ = θ_i (the expert) and summed over the tensors of each layer l (``group_by="layer"``: a
   numbered block ``model.layers.3`` or a module such as ``model.embed_tokens``; ``"tensor"``: each
   tensor alone), averaged over the batches:

       s_i^l = mean_b Σ_{p ∈ l} Σ | w_{i,p} ⊙ ∂L_i(b)/∂θ_p |,   w = θ_i (``sensitivity_weight="full"``)
                                                              or δ_i (``"delta"``: the task vector)

   L_i is the supervised loss of the model (``out.loss``, else cross-entropy of the logits).
2. Task-specific scaling: the sensitivities are normalized within the task by their largest value
   and turned into a distribution over the L layers, scaled to mean 1:

       ŝ_i^l = s_i^l / max_l s_i^l,     α_i^l = L · softmax_l(ŝ_i^l / T_α)     (``layer_temperature``)

3. Cross-task scaling ("logit alignment"): how close expert i's logits are to expert j's on task
   j's data, d_ij = mean over the predictions of ‖z_i(x) − z_j(x)‖₂ for x in task j's batches
   (j ≠ i). An expert that stays close to the others on their data transfers well and gets more
   weight:

       D_i = mean_{j≠i} d_ij,   D̂_i = D_i / max_k D_k,   τ_i = N · softmax_i(−D̂_i / T_τ)   (``cross_temperature``)

4. Combination per layer, across the experts (the paper fuses the two through a softmax with a
   temperature):

       σ_i^l = N · softmax_i(α_i^l · τ_i / T)     (``combine="softmax"``, ``temperature``)
       σ_i^l = α_i^l · τ_i                         (``combine="product"``)

   Every factor has mean 1 over its axis, so uniform sensitivities and distances give σ = 1: the
   merge is exactly the underlying method with its own weights.
5. Use: expert i's weight for a tensor of layer l becomes w_i · σ_i^l, passed to the existing
   methods as per-tensor weights (``merge_models(..., tensor_params=factors.tensor_params)``,
   :class:`~lightning_merge.learned.SensScaled`, or :class:`~lightning_merge.learned.SensMergeCallback`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import ConfigError
from ..lightning.diagnostics import group_of
from .bank import ExpertBank
from .objectives import logits_of, task_loss, token_mask

log = logging.getLogger(__name__)

SensitivityWeight = Literal["full", "delta"]
GroupBy = Literal["layer", "tensor"]
CombineMode = Literal["softmax", "product"]
Call = Callable[[dict[str, Tensor], Mapping[str, Any]], Any]

__all__ = ["FunctionalRunner", "SensFactors", "compute_sens_factors", "sens_factors", "sens_statistics"]


@dataclass
class SensFactors:
    """The Sens-Merging factors of N experts over L layer groups (see the module doc)."""

    experts: list[str]
    groups: list[str]
    #: tensor name -> its layer group
    tensor_groups: dict[str, str]
    sensitivity: list[list[float]]
    distance: list[list[float]]
    alpha: list[list[float]]
    tau: list[float]
    sigma: list[list[float]]
    settings: dict[str, Any] = field(default_factory=dict)

    def weights(self, name: str) -> list[float]:
        """σ_i^l of every expert for tensor ``name`` (1.0 each for a tensor of no known layer)."""
        group = self.tensor_groups.get(name)
        if group is None:
            group = group_of(name) if self.settings.get("group_by", "layer") == "layer" else name
        if group not in self._index:
            return [1.0] * len(self.experts)
        k = self._index[group]
        return [row[k] for row in self.sigma]

    def tensor_params(self, name: str) -> dict[str, list[float]]:
        """Per-tensor parameters for :func:`~lightning_merge.merge_models` (``tensor_params=``)."""
        return {"weights": self.weights(name)}

    def scaled(self, weights: Sequence[float]) -> Callable[[str], dict[str, list[float]]]:
        """``tensor_params`` that multiply the given per-expert ``weights`` by σ."""
        base = [float(w) for w in weights]
        return lambda name: {"weights": [w * s for w, s in zip(base, self.weights(name))]}

    @property
    def _index(self) -> dict[str, int]:
        return {g: k for k, g in enumerate(self.groups)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        from ..targets.atomic import atomic_file

        return atomic_file(path, lambda tmp: tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> SensFactors:
        p = Path(path)
        try:
            data = json.loads(p.read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"'{p}' is not a Sens-Merging factors file ({e}); write one with "
                              "SensFactors.save or SensMergeCallback(factors_out=...)") from None


def _softmax_scaled(x: Tensor, dim: int, t: float) -> Tensor:
    return torch.softmax(x / t, dim=dim) * x.shape[dim]


def sens_factors(sensitivity: Tensor, distance: Tensor, *, layer_temperature: float = 1.0,
                 cross_temperature: float = 1.0, temperature: float = 1.0,
                 combine: CombineMode = "softmax") -> tuple[Tensor, Tensor, Tensor]:
    """(α [N, L], τ [N], σ [N, L]) from sensitivities s [N, L] and distances d [N, N] (float64)."""
    s = sensitivity.double()
    top = s.max(dim=1, keepdim=True).values
    s_hat = torch.where(top > 0, s / top.clamp_min(1e-300), torch.zeros_like(s))
    alpha = _softmax_scaled(s_hat, 1, layer_temperature)
    n = s.shape[0]
    d = distance.double()
    off = ~torch.eye(n, dtype=torch.bool)
    big_d = (d * off).sum(1) / max(n - 1, 1)
    d_hat = big_d / big_d.max() if n > 1 and big_d.max() > 0 else torch.zeros_like(big_d)
    tau = _softmax_scaled(-d_hat, 0, cross_temperature)
    prod = alpha * tau[:, None]
    sigma = _softmax_scaled(prod, 0, temperature) if combine == "softmax" else prod
    return alpha, tau, sigma


def _groups(names: Sequence[str], group_by: GroupBy) -> tuple[list[str], dict[str, str]]:
    mapping = {n: (group_of(n) if group_by == "layer" else n) for n in names}
    return list(dict.fromkeys(mapping.values())), mapping


class FunctionalRunner:
    """Runs expert m as the target through ``call(params, inputs)``, θ_m = θ₀ + δ_m as float32 leaf
    tensors (one model copy and its gradient). :class:`~lightning_merge.learned.sharded.ShardedRunner`
    does the same on an FSDP2 module, writing θ_m into its shards."""

    def __init__(self, bank: ExpertBank, call: Call) -> None:
        self.bank, self.call = bank, call

    def expert_grads(self, m: int, batch: Mapping[str, Any]) -> tuple[Tensor, list[tuple[str, Tensor, Tensor]]]:
        """Expert m's logits on ``batch`` (detached, float32) and ``(name, θ_m, ∂L/∂θ_m)`` per tensor."""
        params = self.bank.expert_params(m, requires_grad=True)
        with torch.enable_grad():
            out = self.call(params, batch)
            loss = task_loss(out, batch)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        found = [(name, p.detach(), g) for (name, p), g in zip(params.items(), grads) if g is not None]
        return logits_of(out).detach().float(), found

    @torch.no_grad()
    def expert_logits(self, i: int, inputs: Mapping[str, Any]) -> Tensor:
        return logits_of(self.call(self.bank.expert_params(i), inputs)).float()

    def total(self, sens: Tensor) -> Tensor:
        """The sensitivities summed over the workers that each saw part of every tensor (here one)."""
        return sens


def sens_statistics(bank: ExpertBank, call: Call | Any, data: Mapping[str, Iterable[Mapping[str, Any]]],
                    expert_tasks: Sequence[str], *, max_batches: int = 8,
                    sensitivity_weight: SensitivityWeight = "full",
                    group_by: GroupBy = "layer") -> tuple[Tensor, Tensor, list[str], dict[str, str]]:
    """The calibration pass: (s [N, L], d [N, N], groups, tensor -> group); see the module doc.

    ``call(params, inputs)`` runs the model with ``params`` (the bank's names) in place of the
    target's tensors (or ``call`` is a runner: :class:`FunctionalRunner`'s three methods). Per
    batch of task i: one forward+backward of expert i and N − 1 no-grad forwards of the others.
    """
    runner = call if hasattr(call, "expert_grads") else FunctionalRunner(bank, call)
    n = bank.n_experts
    groups, mapping = _groups(bank.names, group_by)
    gi = {g: k for k, g in enumerate(groups)}
    sens = torch.zeros(n, len(groups), dtype=torch.float64)
    dist = torch.zeros(n, n, dtype=torch.float64)
    counts = torch.zeros(n, n, dtype=torch.float64)
    for m, task in enumerate(expert_tasks):
        batches = 0
        for k, batch in enumerate(data[task]):
            if k >= max_batches:
                break
            z_m, found = runner.expert_grads(m, batch)
            with torch.no_grad():
                for name, p, g in found:
                    w = p if sensitivity_weight == "full" else bank.delta(m, name)
                    if w is not None:
                        sens[m, gi[mapping[name]]] += float((w.to(torch.float32) * g).abs().sum())
                del found
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                mask = token_mask(z_m, inputs)
                for i in range(n):
                    if i == m:
                        continue
                    z_i = runner.expert_logits(i, inputs)
                    per = (z_i - z_m).norm(dim=-1)
                    dist[i, m] += float(per[mask].mean() if mask is not None else per.mean())
                    counts[i, m] += 1
            batches += 1
        if batches == 0:
            raise ConfigError(f"Sens-Merging: task '{task}' (expert {m}) gave no calibration batch")
        sens[m] /= batches
    sens = runner.total(sens)
    dist = torch.where(counts > 0, dist / counts.clamp_min(1), torch.zeros_like(dist))
    return sens, dist, groups, mapping


def compute_sens_factors(bank: ExpertBank, call: Call, data: Mapping[str, Iterable[Mapping[str, Any]]],
                         expert_tasks: Sequence[str], *, max_batches: int = 8,
                         sensitivity_weight: SensitivityWeight = "full", group_by: GroupBy = "layer",
                         layer_temperature: float = 1.0, cross_temperature: float = 1.0, temperature: float = 1.0,
                         combine: CombineMode = "softmax") -> SensFactors:
    """Run :func:`sens_statistics` and :func:`sens_factors`; returns the :class:`SensFactors`."""
    if len(expert_tasks) != bank.n_experts:
        raise ConfigError(f"Sens-Merging: expert_tasks {list(expert_tasks)} must name one task per expert "
                          f"({bank.n_experts})")
    missing = [t for t in expert_tasks if t not in data]
    if missing:
        raise ConfigError(f"Sens-Merging: expert_tasks {missing} have no calibration data (tasks: {list(data)})")
    s, d, groups, mapping = sens_statistics(bank, call, data, expert_tasks, max_batches=max_batches,
                                            sensitivity_weight=sensitivity_weight, group_by=group_by)
    alpha, tau, sigma = sens_factors(s, d, layer_temperature=layer_temperature, cross_temperature=cross_temperature,
                                     temperature=temperature, combine=combine)
    settings = {"max_batches": max_batches, "sensitivity_weight": sensitivity_weight, "group_by": group_by,
                "layer_temperature": layer_temperature, "cross_temperature": cross_temperature,
                "temperature": temperature, "combine": combine, "expert_tasks": list(expert_tasks)}
    factors = SensFactors(experts=list(bank.labels), groups=groups, tensor_groups=mapping, sensitivity=s.tolist(),
                          distance=d.tolist(), alpha=alpha.tolist(), tau=tau.tolist(), sigma=sigma.tolist(),
                          settings=settings)
    log.info("Sens-Merging: tau %s; sigma per expert (mean over %d layers) %s", [round(t, 3) for t in factors.tau],
             len(groups), [round(sum(r) / len(r), 3) for r in factors.sigma])
    return factors
