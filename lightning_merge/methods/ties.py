"""TIES-Merging (Yadav et al., NeurIPS 2023), spec §3: trim → elect → disjoint mean → λ.

    τ̂_t = trim(δ_t, d_t)                      keep the top d_t fraction of |δ_t|
    γ   = sign(Σ_t w_t τ̂_t)   (S = 0 → +1)    sign election on the weighted *mass*
    A_t = [sign(τ̂_t) = γ]
    Δ   = Σ_t A_t w_t τ̂_t / Σ_t A_t w_t      (denominator 0 → 1)
    θ*  = θ₀ + λ Δ

Options that reproduce the reference implementations:

* ``trim_scope="tensor"`` (mergekit, PEFT; default) ranks |δ| within each tensor;
  ``"global"`` (the official repo) ranks over the whole task vector of each expert. The global
  threshold is found exactly in two streaming statistics passes over the bit patterns of |δ|
  (float32 bit patterns of non-negative numbers sort like the numbers), so memory stays
  O(largest tensor), never O(model). Entries tied with the threshold are all kept.
* ``trim_rule="exact_k"`` keeps exactly ⌊d·n⌋ entries (ties to the lower index);
  ``"official"`` keeps |δ| ≥ the (n − ⌊n·d⌋)-th smallest, i.e. ⌊n·d⌋ + 1 entries (official repo).
* ``election="weighted"`` elects on w_t τ̂_t (mergekit, the spec); ``"unweighted"`` on τ̂_t (PEFT).
* ``divisor="weights"`` divides by Σ A_t w_t (spec, mergekit); ``"count"`` by Σ A_t (PEFT).
* ``normalize=False`` sums the elected entries instead of averaging them.
* ``zero_sign``: ``"positive"`` (mergekit, PEFT) or ``"majority"`` (official TIES).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .base import DeltaMethod, PerExpert, TensorInputs, check_choice, check_range, explain
from .kernels import ZeroSign, abs_bits, elect_and_fuse, threshold_mask, top_bucket, topk_mask, topk_thresholds
from .yaml_spec import Contract, MergekitSpec, collapse, gta_params

TrimRule = Literal["exact_k", "official"]


@dataclass(frozen=True, kw_only=True)
class Ties(DeltaMethod):
    """TIES-Merging. ``density`` is the kept fraction (the paper's k; official default 0.2)."""

    name = "ties"
    contract = Contract(identity={"density": 1.0}, typical={"density": 0.3})
    reference = 'Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)'
    mergekit = MergekitSpec("ties", gta_params(True, False), "required", lambda s, pm, notes: _from_mergekit(s, pm))
    allow_negative_weights = False
    per_expert_params = ("density",)
    density: PerExpert = 0.2
    trim_scope: Literal["tensor", "global"] = "tensor"
    trim_rule: TrimRule = "exact_k"
    election: Literal["weighted", "unweighted"] = "weighted"
    divisor: Literal["weights", "count"] = "weights"
    normalize: bool = True
    zero_sign: ZeroSign = "positive"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self.name, "density", self.density, 0.0, 1.0, lo_open=True,
                    hint="density is the kept fraction; 1.0 disables the trim")
        check_choice(self.name, "trim_scope", self.trim_scope, ("tensor", "global"))
        check_choice(self.name, "trim_rule", self.trim_rule, ("exact_k", "official"))
        check_choice(self.name, "election", self.election, ("weighted", "unweighted"))
        check_choice(self.name, "divisor", self.divisor, ("weights", "count"))
        check_choice(self.name, "zero_sign", self.zero_sign, ("positive", "majority"))

    @property
    def statistics_passes(self) -> int:  # type: ignore[override]
        """The global trim needs two passes over the model (histograms, then thresholds)."""
        return 2 if self.trim_scope == "global" else 0

    # ---- trim
    def trim(self, inputs: TensorInputs) -> list[Tensor]:
        out = []
        for i, d in enumerate(inputs.tensors):
            density = inputs.per_expert(self.density, i)
            if self.trim_scope == "global" and density < 1.0:
                thr_bits = inputs.stats["threshold"][inputs.experts[i]]
                keep = abs_bits(d).long() >= thr_bits
            elif self.trim_rule == "official":
                keep = threshold_mask(d, density)
            else:
                keep = topk_mask(d, density)
            out.append(d.mul_(keep))  # inputs.tensors are the method's own (see TensorInputs)
        return out

    def combine(self, inputs: TensorInputs) -> Tensor:
        fuse = {"election": self.election, "divisor": self.divisor, "normalize": self.normalize,
                "zero_sign": self.zero_sign, "consume": True}
        if self.trim_scope == "global" or self.trim_rule == "official":
            return elect_and_fuse(self.trim(inputs), inputs.weights, **fuse)
        # the exact-k trim as thresholds, applied block by block inside the fused loop
        dens = [inputs.per_expert(self.density, i) for i in range(len(inputs.tensors))]
        thr = topk_thresholds(inputs.tensors, dens)

        def trim_block(t: int, block: Tensor, start: int) -> Tensor:
            return block if thr[t] is None else block.mul_(block.abs() >= thr[t])

        return elect_and_fuse(inputs.tensors, inputs.weights, prepare=trim_block, **fuse)

    # ---- global trim: exact k-th largest |δ| per expert over the whole model, in two passes
    def _density_of(self, expert: int) -> float:
        d = self.density
        return float(d[expert]) if isinstance(d, (list, tuple)) else float(d)

    def _global_k(self, stats: dict[str, Any], expert: int) -> int:
        """k = ⌊d·N⌋ over the expert's whole task vector (0 when the trim is off or keeps nothing)."""
        d = self._density_of(expert)
        return 0 if d >= 1.0 else int(d * stats["n"][expert])

    def init_statistics(self) -> dict[str, Any]:
        return {"hi": {}, "lo": {}, "n": {}}

    def observe(self, stats: dict[str, Any], pass_index: int, inputs: TensorInputs) -> None:
        for i, d in enumerate(inputs.tensors):
            e = inputs.experts[i]
            bits = abs_bits(d).flatten()
            if pass_index == 0:
                h = torch.bincount(bits >> 16, minlength=1 << 15).cpu()
                stats["hi"][e] = stats["hi"].get(e, 0) + h
                stats["n"][e] = stats["n"].get(e, 0) + bits.numel()
            else:
                hb = stats["bin"].get(e)
                if hb is None:
                    continue
                sel = bits[(bits >> 16) == hb] & 0xFFFF
                h = torch.bincount(sel, minlength=1 << 16).cpu()
                stats["lo"][e] = stats["lo"].get(e, 0) + h

    def combine_statistics(self, parts: list[Any], pass_index: int) -> Any:
        out = parts[0]
        for p in parts[1:]:
            for key in (("hi", "n") if pass_index == 0 else ("lo",)):
                for e, v in p[key].items():
                    out[key][e] = out[key].get(e, 0) + v
        return out

    def finish_pass(self, stats: dict[str, Any], pass_index: int) -> dict[str, Any]:
        if pass_index == 0:  # high 16 bits: the bucket holding each expert's k-th largest |δ|
            stats["bin"], stats["above"] = {}, {}
            for e, hist in stats["hi"].items():
                k = self._global_k(stats, e)
                if k > 0:
                    stats["bin"][e], stats["above"][e] = top_bucket(hist, k)
        else:  # low 16 bits within that bucket: the exact threshold
            stats["threshold"] = {}
            for e, b in stats["bin"].items():
                lo, _ = top_bucket(stats["lo"][e], self._global_k(stats, e) - stats["above"][e])
                stats["threshold"][e] = (b << 16) | lo
            for e in stats["n"]:
                # density >= 1 keeps all (-1); k == 0 keeps nothing (above every bit pattern)
                stats["threshold"].setdefault(e, -1 if self._density_of(e) >= 1.0 else 1 << 31)
        return stats


def _from_mergekit(s, pm):
    from ..errors import ConfigError

    if s["rescale"]:
        raise ConfigError(
            "parameters.rescale: 'rescale: true' for ties (L1 rescaling after the magnitude trim) is not "
            "supported; remove it (the default is false)"
        )
    return "ties", {
        "density": collapse(pm["density"]), "normalize": s["normalize"], "lambda_": s["lambda"],
        "trim_scope": "tensor", "trim_rule": "exact_k", "election": "weighted",
        "divisor": "weights", "zero_sign": "positive",
    }


explain(Ties, math=__doc__)
