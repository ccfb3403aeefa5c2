"""Adaptive-RMS merging ("Model Merging with Adaptive Drop Rate based on Weight Importance", seed 001),
spec §6: Compute → Drop → Merge → Rescale, with a drop rate per (expert, layer, role).

Statistics pass (one pass over every role tensor, :meth:`AdaptiveRMS.observe`):

    rms[t,k,r] = ‖δ^t_{k,r}‖_F / sqrt(numel)      (``rms_denominator="numel"``: / numel)
                 · rms_unit_scale
    μ_t[r]     = mean_k rms[t,k,r]                 each expert's mean over the role's matrices
    μ[r]       = mean_{t,k} rms[t,k,r]             pooled over experts and matrices
    CV[r]      = 100 · std_{ddof=1}(μ_t[r] over t) / mean_t(μ_t[r])      (percent; 0 if T < 2 or mean 0)
    ref[t,r]   = μ[r] if CV[r] <= cv_threshold else μ_t[r]
    p[t,k,r]   = clip(p_default − λ_drop · (rms[t,k,r] − ref[t,r]), 0, p_max)

Merge of one matrix (k, r):

    keep_t ~ Bernoulli(1 − p[t,k,r])   (``drop_mode="magnitude"``: the top ⌊(1 − p)·n⌋ of |δ_t|)
    δ̃_t   = keep_t ⊙ δ_t                          no rescale here
    γ      = sign(Σ_t w_t δ̃_t)   (S = 0 → +1)     sign election on the mass
    δ̄     = Σ_t A_t w_t δ̃_t / Σ_t A_t w_t         disjoint mean (denominator 0 → 1)
    Δ*     = δ̄ / (1 − min_t p[t,k,r])             (Δ* = 0 when min_t p = 1)
    θ*     = θ₀ + λ · Δ*                           λ = ``lambda_`` (the spec's ``merge_lambda``)

Parameter names. The slides state the rule in drop rates, so the hyperparameters are drop rates
too: ``drop_rate`` is the slides' p_default (the keep fraction is 1 − drop_rate; this method has no
``density``), ``drop_scale`` is the slides' λ (the "drop scale"), ``lambda_`` the post-merge scale.

Roles (spec §6.2 (5)). A *role tensor* is a 2-D ``*.weight`` inside a numbered block
(``layers.<i>.``, ``layer.<i>.``, ``h.<i>.``, ``block.<i>.``, ``blocks.<i>.``); the block number is
its layer index k. With ``roles="module"`` the role key is the block stack plus the module path
after the block index, e.g. ``model.layers.*.self_attn.q_proj``, so each role has one matrix per
layer. With ``roles="attn_ffn"`` the module path is classified as attention or FFN by name
(``model.layers.*.attn`` / ``model.layers.*.ffn``; several matrices per layer); a module that is
neither keeps its module role. Every other tensor (embeddings, lm_head, norms, biases, weights
outside blocks) has no role and follows ``non_role``: ``"drop_default"`` drops with p = p_default
(clipped to p_max) and rescales by 1/(1 − min_t p), ``"ties_nodrop"`` elects and takes the disjoint
mean with no drop and no rescale.

``cv_scope="global"`` computes one CV over the experts' means pooled over every role matrix and
uses its branch for every role; the references μ[r] and μ_t[r] stay per role (rms scales differ
between roles, e.g. q_proj vs v_proj).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import MergeError
from ..naming import layer_of
from .base import (
    DeltaMethod,
    PerExpert,
    TensorInputs,
    check_choice,
    check_range,
)
from .kernels import ZeroSign, bernoulli_keep, elect_and_fuse, topk_mask
from .yaml_spec import Contract

log = logging.getLogger(__name__)

RmsDenominator = Literal["sqrt_numel", "numel"]
Branch = Literal["global", "per_model"]

_ATTN_PARTS = ("attn", "attention")
_ATTN_MODULES = {
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query", "key", "value", "q", "k", "v", "o",
    "wq", "wk", "wv", "wo", "wqkv", "query_key_value", "c_attn", "out_proj", "in_proj",
}
_FFN_PARTS = ("mlp", "ffn", "feed_forward", "feedforward", "intermediate", "densereludense", "moe", "experts")
_FFN_MODULES = {
    "gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "c_fc", "w1", "w2", "w3", "wi",
    "wi_0", "wi_1", "dense_h_to_4h", "dense_4h_to_h",
}


def _attn_or_ffn(module: str) -> str | None:
    parts = module.lower().split(".")
    if any(a in p for p in parts for a in _ATTN_PARTS):
        return "attn"
    if any(f in p for p in parts for f in _FFN_PARTS):
        return "ffn"
    if parts[-1] in _ATTN_MODULES:
        return "attn"
    if parts[-1] in _FFN_MODULES or module.lower() == "output.dense":  # BERT's FFN output
        return "ffn"
    return None


def tensor_role(
    name: str, ndim: int, roles: Literal["module", "attn_ffn"] = "module"
) -> tuple[str, int] | None:
    """The (role key, layer index) of a tensor, or None when it has no role (see the module doc)."""
    if ndim != 2 or not name.endswith(".weight"):
        return None
    parts = layer_of(name)
    if parts is None:
        return None
    stack_name, layer, rest = parts
    module = rest[: -len(".weight")]
    if not module:
        return None
    if roles == "attn_ffn":
        kind = _attn_or_ffn(module)
        if kind is not None:
            return f"{stack_name}.*.{kind}", layer
    return f"{stack_name}.*.{module}", layer


# ------------------------------------------------------------------------------------ pure helpers

def rms_of(delta: Tensor, denominator: RmsDenominator = "sqrt_numel") -> float:
    """‖δ‖_F / sqrt(numel) (the true root mean square) or ‖δ‖_F / numel (spec §6.2 (1))."""
    n = delta.numel()
    if n == 0:
        return 0.0
    norm = float(torch.linalg.vector_norm(delta.detach().to(torch.float32).flatten()))
    return norm / (math.sqrt(n) if denominator == "sqrt_numel" else n)


def cv_percent(values: Sequence[float]) -> float:
    """CV = 100 · std_{ddof=1}(values) / mean(values); 0 when fewer than 2 values or the mean is 0."""
    vals = [float(v) for v in values]
    if len(vals) < 2:
        return 0.0
    mean = math.fsum(vals) / len(vals)
    if mean == 0.0:
        return 0.0
    var = math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return 100.0 * math.sqrt(var) / mean


def _resolve(value: PerExpert, expert: int) -> float:
    return float(value[expert]) if isinstance(value, (list, tuple)) else float(value)


@dataclass
class RoleSummary:
    """The statistics of one role r.

    Attributes:
        role: the role key.
        tensors: the role's matrices (its "layers"), sorted by (layer, name).
        per_model_mean: μ_t[r] per expert (over the matrices that expert has).
        global_mean: μ[r], pooled over every (expert, matrix).
        cv_percent: the CV that chose the branch (this role's, or the global one with ``cv_scope="global"``).
        branch: ``"global"`` (ref = μ[r], CV <= threshold) or ``"per_model"`` (ref = μ_t[r]).
    """

    role: str
    tensors: list[str]
    per_model_mean: dict[int, float]
    global_mean: float
    cv_percent: float
    branch: Branch


def role_drop_rates(
    rms: Mapping[str, Mapping[int, float]],
    *,
    drop_rate: PerExpert,
    drop_scale: float,
    cv_threshold: float = 50.0,
    p_max: float = 0.99,
    cv: float | None = None,
    role: str = "",
) -> tuple[dict[str, dict[int, float]], RoleSummary]:
    """Drop rates p[t,k] of one role from its rms table ``rms[matrix][expert]`` (spec §6.3, pass 1).

    ``cv`` overrides the role's own CV (``cv_scope="global"``). Returns ({matrix: {expert: p}}, summary).
    """
    tensors = list(rms)
    by_expert: dict[int, list[float]] = {}
    for name in tensors:
        for e, v in rms[name].items():
            by_expert.setdefault(e, []).append(float(v))
    mu_t = {e: math.fsum(v) / len(v) for e, v in sorted(by_expert.items())}
    pooled = [float(v) for name in tensors for v in rms[name].values()]
    mu = math.fsum(pooled) / len(pooled) if pooled else 0.0
    cv_r = cv_percent(list(mu_t.values())) if cv is None else cv
    branch: Branch = "global" if cv_r <= cv_threshold else "per_model"
    drop: dict[str, dict[int, float]] = {}
    for name in tensors:
        drop[name] = {}
        for e, v in rms[name].items():
            ref = mu if branch == "global" else mu_t[e]
            p = _resolve(drop_rate, e) - drop_scale * (float(v) - ref)
            drop[name][e] = min(max(p, 0.0), p_max)
    return drop, RoleSummary(role, tensors, mu_t, mu, cv_r, branch)


def merge_with_masks(
    deltas: Sequence[Tensor],
    keep_masks: Sequence[Tensor],
    drop_rates: Sequence[float],
    weights: Sequence[float] | None = None,
    *,
    zero_sign: ZeroSign = "positive",
) -> Tensor:
    """Δ* of one matrix given the keep masks: elect and disjoint-mean keep ⊙ δ (no per-model rescale),
    then rescale once by 1/(1 − min_t p_t); Δ* = 0 when min_t p_t >= 1 (spec §6.3, pass 2).

    ``weights`` default to 1. λ is not applied here.
    """
    p_min = min(float(p) for p in drop_rates)
    if p_min >= 1.0:
        return torch.zeros_like(deltas[0])
    x = [d * m.to(d.dtype) for d, m in zip(deltas, keep_masks, strict=True)]
    w = [1.0] * len(deltas) if weights is None else [float(v) for v in weights]
    return elect_and_fuse(x, w, zero_sign=zero_sign, consume=True).div_(1.0 - p_min)


# ------------------------------------------------------------------------------------- statistics

@dataclass
class AdaptiveRMSStatistics:
    """What the statistics pass found (``inputs.stats`` during the merge).

    Attributes:
        rms: rms[tensor][expert] (times ``rms_unit_scale``), role tensors only.
        roles: role key per role tensor.
        layers: layer index per role tensor.
        summaries: one :class:`RoleSummary` per role.
        drop: p[tensor][expert], role tensors only.
        n_experts: the number of experts in the merge.
        global_cv_percent: the CV over all roles (``cv_scope="global"``), else None.
    """

    rms: dict[str, dict[int, float]] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    layers: dict[str, int] = field(default_factory=dict)
    summaries: dict[str, RoleSummary] = field(default_factory=dict)
    drop: dict[str, dict[int, float]] = field(default_factory=dict)
    n_experts: int = 0
    global_cv_percent: float | None = None


# ----------------------------------------------------------------------------------------- method

@dataclass(frozen=True, kw_only=True)
class AdaptiveRMS(DeltaMethod):
    """Adaptive-RMS: per-(expert, layer, role) drop rates from the rms of each delta matrix.

    Attributes:
        drop_rate: p_default, the drop rate of a matrix whose rms equals its reference (slides:
            0.7 or 0.9); keep fraction = 1 − drop_rate. One value or one per expert.
        drop_scale: λ_drop, the slope of p in rms (in rms units times ``rms_unit_scale``). The
            slides give no value; with raw rms of LoRA deltas (~1e-4 to 1e-3) the default 100
            moves p by about 0.01-0.1. Use ``rms_unit_scale=1e3`` to work in the slides' units.
        rms_denominator: ``"sqrt_numel"`` (true RMS, default) or ``"numel"`` (‖W‖_F / numel).
        rms_unit_scale: multiplies every rms before the drop-rate rule.
        cv_threshold: the CV (percent) above which each expert is compared with its own mean.
        cv_scope: ``"role"`` (one CV per role) or ``"global"`` (one CV for all roles).
        roles: ``"module"`` (one role per module type) or ``"attn_ffn"`` (attention vs FFN).
        p_max: upper clip of p (lower clip 0).
        non_role: policy for tensors with no role: ``"drop_default"`` or ``"ties_nodrop"``.
        drop_mode: ``"bernoulli"`` (the slides' method) or ``"magnitude"`` (the slides' "other drop
            version": keep the top ⌊(1 − p)·n⌋ entries by |δ|).
        zero_sign: the elected sign where Σ_t w_t δ̃_t = 0 (``"positive"``, the spec's rule).
        lambda_: the spec's ``merge_lambda``, θ* = θ₀ + λ Δ* (default 1).
    """

    name = "adaptive_rms"
    contract = Contract(identity={"drop_rate": 0.0, "drop_scale": 0.0},
                        typical={"drop_rate": 0.7, "drop_scale": 0.5})
    reference = "the project's seed 001: adaptive drop rates from delta RMS"
    allow_negative_weights = False
    statistics_passes = 1
    per_expert_params = ("drop_rate",)

    drop_rate: PerExpert = 0.7
    drop_scale: float = 100.0
    rms_denominator: RmsDenominator = "sqrt_numel"
    rms_unit_scale: float = 1.0
    cv_threshold: float = 50.0
    cv_scope: Literal["role", "global"] = "role"
    roles: Literal["module", "attn_ffn"] = "module"
    p_max: float = 0.99
    non_role: Literal["drop_default", "ties_nodrop"] = "drop_default"
    drop_mode: Literal["bernoulli", "magnitude"] = "bernoulli"
    zero_sign: ZeroSign = "positive"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self.name, "drop_rate", self.drop_rate, 0.0, 1.0,
                    hint="drop_rate is the slides' p_default (fraction dropped); "
                    "keep fraction = 1 - drop_rate")
        check_range(self.name, "drop_scale", self.drop_scale, 0.0, math.inf,
                    hint="drop_scale is λ_drop, the slope of the drop rate in rms")
        check_choice(self.name, "rms_denominator", self.rms_denominator, ("sqrt_numel", "numel"))
        check_range(self.name, "rms_unit_scale", self.rms_unit_scale, 0.0, math.inf, lo_open=True)
        check_range(self.name, "cv_threshold", self.cv_threshold, 0.0, math.inf,
                    hint="the threshold is a CV in percent (slides: 50)")
        check_choice(self.name, "cv_scope", self.cv_scope, ("role", "global"))
        check_choice(self.name, "roles", self.roles, ("module", "attn_ffn"))
        check_range(self.name, "p_max", self.p_max, 0.0, 1.0, hint="the upper clip of the drop rate")
        check_choice(self.name, "non_role", self.non_role, ("drop_default", "ties_nodrop"))
        check_choice(self.name, "drop_mode", self.drop_mode, ("bernoulli", "magnitude"))
        check_choice(self.name, "zero_sign", self.zero_sign, ("positive", "majority"))

    # ---- statistics: pass 0 records rms per (tensor, expert); finish_pass derives p
    def init_statistics(self) -> dict[str, Any]:
        return {}

    def observe(self, stats: dict[str, Any], pass_index: int, inputs: TensorInputs) -> None:
        if not inputs.tensors:
            return
        role = tensor_role(inputs.name, inputs.tensors[0].dim(), self.roles)
        if role is None:
            return
        rec = stats.setdefault(inputs.name, {"role": role[0], "layer": role[1], "rms": {}, "n": 0})
        rec["n"] = max(rec["n"], inputs.n_experts)
        for i, d in enumerate(inputs.tensors):
            rec["rms"][inputs.experts[i]] = rms_of(d, self.rms_denominator) * self.rms_unit_scale

    def combine_statistics(self, parts: list[Any], pass_index: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part in parts:
            for name, rec in (part or {}).items():
                if name not in out:
                    out[name] = {"role": rec["role"], "layer": rec["layer"], "rms": {}, "n": 0}
                out[name]["rms"].update(rec["rms"])
                out[name]["n"] = max(out[name]["n"], rec["n"])
        return out

    def finish_pass(self, stats: dict[str, Any], pass_index: int) -> AdaptiveRMSStatistics:
        res = AdaptiveRMSStatistics(n_experts=max((r["n"] for r in stats.values()), default=0))
        groups: dict[str, list[str]] = {}
        for name in sorted(stats, key=lambda k: (stats[k]["layer"], k)):
            rec = stats[name]
            res.rms[name] = dict(sorted(rec["rms"].items()))
            res.roles[name] = rec["role"]
            res.layers[name] = rec["layer"]
            groups.setdefault(rec["role"], []).append(name)
        cv = None
        if self.cv_scope == "global":
            by_expert: dict[int, list[float]] = {}
            for name in res.rms:
                for e, v in res.rms[name].items():
                    by_expert.setdefault(e, []).append(v)
            cv = cv_percent([math.fsum(v) / len(v) for _, v in sorted(by_expert.items())])
            res.global_cv_percent = cv
        for role in sorted(groups):
            drop, summary = role_drop_rates(
                {n: res.rms[n] for n in groups[role]}, drop_rate=self.drop_rate, drop_scale=self.drop_scale,
                cv_threshold=self.cv_threshold, p_max=self.p_max, cv=cv, role=role,
            )
            res.drop.update(drop)
            res.summaries[role] = summary
            log.info("adaptive_rms: role %s: %d matrices, CV %.4g%% -> %s branch, p in [%.4g, %.4g]",
                     role, len(summary.tensors), summary.cv_percent, summary.branch,
                     min(p for d in drop.values() for p in d.values()),
                     max(p for d in drop.values() for p in d.values()))
        return res

    @staticmethod
    def drop_rates(stats: AdaptiveRMSStatistics) -> dict[str, list[float]]:
        """p per role tensor, one entry per expert of the merge (NaN for an expert lacking the tensor)."""
        out: dict[str, list[float]] = {}
        for name, per in stats.drop.items():
            n = max(stats.n_experts, max(per, default=-1) + 1)
            out[name] = [per.get(e, math.nan) for e in range(n)]
        return out

    # ---- merge
    def tensor_drop_rates(self, inputs: TensorInputs) -> list[float] | None:
        """p_t for each entry of ``inputs``.

        None for a tensor with no role under ``non_role="ties_nodrop"`` (no drop, no rescale).
        """
        role = tensor_role(inputs.name, inputs.tensors[0].dim(), self.roles) if inputs.tensors else None
        if role is None:
            if self.non_role == "ties_nodrop":
                return None
            return [min(max(inputs.per_expert(self.drop_rate, i), 0.0), self.p_max)
                    for i in range(len(inputs.tensors))]
        stats = inputs.stats
        if not isinstance(stats, AdaptiveRMSStatistics) or inputs.name not in stats.drop:
            raise MergeError(
                f"adaptive_rms: no rms statistics for tensor '{inputs.name}'; run the statistics pass over "
                "every tensor first (engine.compute_statistics, or run_plan which does it)"
            )
        per = stats.drop[inputs.name]
        missing = [e for e in inputs.experts if e not in per]
        if missing:
            raise MergeError(f"adaptive_rms: statistics for '{inputs.name}' lack experts {missing}")
        return [per[e] for e in inputs.experts]

    def keep_masks(self, inputs: TensorInputs, drop_rates: Sequence[float]) -> list[Tensor]:
        """The keep mask of each entry: Bernoulli(1 − p_t) per element, or the top ⌊(1 − p_t)·n⌋ by |δ|."""
        masks = []
        for i, (d, p) in enumerate(zip(inputs.tensors, drop_rates, strict=True)):
            if p <= 0.0:
                masks.append(torch.ones_like(d, dtype=torch.bool))
            elif self.drop_mode == "magnitude":
                masks.append(topk_mask(d, 1.0 - p))
            else:
                masks.append(bernoulli_keep(1.0 - p, d, inputs.stream(i)))
        return masks

    def combine(self, inputs: TensorInputs) -> Tensor:
        p = self.tensor_drop_rates(inputs)
        if p is None:
            p = [0.0] * len(inputs.tensors)
            masks = [torch.ones_like(d, dtype=torch.bool) for d in inputs.tensors]
        else:
            masks = self.keep_masks(inputs, p)
        return merge_with_masks(inputs.tensors, masks, p, inputs.weights, zero_sign=self.zero_sign)


__all__ = [
    "AdaptiveRMS",
    "AdaptiveRMSStatistics",
    "RoleSummary",
    "cv_percent",
    "merge_with_masks",
    "rms_of",
    "role_drop_rates",
    "tensor_role",
]
