"""DPPA — Dynamic Pruning + Dynamic Partition Amplification (Zhu, Xia, Zhang 2024), spec §7.

Read from the reference code (OWL-style outlier-weighted sparsity applied to deltas). Per expert t,
independently:

DP, dynamic pruning (§7.2). Over the *prunable* matrices (2-D ``*.weight`` tensors inside numbered
decoder blocks ``layers.<i>.`` / ``layer.<i>.`` / ``h.<i>.`` / ``block(s).<i>.``; embeddings,
lm_head, norms and biases are never pruned):

    ratio(a, M)  = 100 · count(a > M · mean(a)) / size(a)       a = |δ| flattened (0 when mean(a) = 0)
    o_i  = ratio(concat_{j in block i} |δ_j|, M_layer)           block level (M_layer = 3)
    o    = (o − mean(o)) · Λ / max|o − mean(o)|                  (0 when the max is 0)
    a_j  = ratio(|δ_j|, M_mat)                                   matrix level (M_mat = 5)
    a    = a / mean(a)   (skipped when mean(a) = 0);  a = a − Σ_j a_j n_j / Σ_j n_j;  a = a · Λ / max|a|
    d_j  = density + o_{block(j)} + a_j                          matrix density (keep fraction)
    s_j  = clamp(1 − d_j, 0, 1)

and each matrix is magnitude-pruned at s_j: with ``dppa_compat=True`` (the reference) idx = ⌊n·s⌋,
thr = sort(|δ|)[idx], keep |δ| > thr (so n − idx − 1 entries, fewer with ties; nothing when
idx >= n); with ``dppa_compat=False`` keep exactly n − ⌊n·s⌋ entries (stable, ties to the lower
flat index). DP runs twice with the same offsets: at ``density_top`` = 1 − S_hi (reference S_hi =
0.9) and at ``density_band`` = 1 − S_lo (S_lo = 0.8). ``density_band`` is the density of the *lower*
sparsity, i.e. of the union of both partitions; the band alone holds about density_band − density_top.

DPA, partition amplification (§7.3). P_top = kept at density_top, P_band = kept at density_band but
not at density_top:

    δ_amp = max(α_top, α_band) · δ  on P_top,    α_band · δ  on P_band,    0 elsewhere

(the reference's "pick the larger magnitude" of α_band·δ^(S_lo) and α_top·δ^(S_hi), for α >= 0).
With ``amplify_unpruned=True`` (reference) the tensors that are not prunable get max(α_top, α_band)·δ,
otherwise δ.

Combination (§7.5, not specified by the reference code, which prunes one model):
``combination="task_arithmetic"`` gives θ* = θ₀ + λ Σ_t w_t δ_amp,t; ``combination="ties"`` elects signs and
takes the disjoint mean of the δ_amp,t, then θ₀ + λ Δ.

Two statistics passes, order-independent and keyed by (tensor, expert): pass 0 records Σ|δ|, numel
and the matrix outlier count of each prunable matrix (the matrix mean is local); after it, each
block's mean |δ| over the concatenated block is known, and pass 1 counts |δ| > M_layer · block mean.
The α coordinate-ascent search (§7.4) is not part of this method; :func:`dpa_amplify` is the pure
step it drives.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import ConfigError, MergeError
from ..naming import layer_of
from .base import DeltaMethod, PerExpert, TensorInputs, check_choice, check_range
from .kernels import ZeroSign, elect_and_fuse, weighted_sum
from .yaml_spec import Contract

log = logging.getLogger(__name__)

BlockKey = tuple[str, int]


def block_key(name: str) -> BlockKey | None:
    """(stack name, block index) of a tensor inside a numbered block, else None."""
    parts = layer_of(name)
    return None if parts is None else (parts[0], parts[1])


def is_prunable(name: str, ndim: int) -> bool:
    """True for the 2-D ``*.weight`` of a linear layer inside a numbered block (spec §7.2)."""
    return ndim == 2 and name.endswith(".weight") and "embed" not in name and block_key(name) is not None


# ------------------------------------------------------------------------------------ pure helpers

def outlier_ratio(abs_values: Tensor, multiple: float) -> float:
    """100 · count(a > M · mean(a)) / size(a) for a = |δ| (0 when the mean is 0 or a is empty)."""
    a = abs_values.detach().flatten()
    if a.numel() == 0:
        return 0.0
    mean = float(a.sum(dtype=torch.float64)) / a.numel()
    if mean == 0.0:
        return 0.0
    return 100.0 * int((a > multiple * mean).sum()) / a.numel()


def layer_adjustments(ratios: Sequence[float], adjust: float) -> list[float]:
    """Block-level offsets: o − mean(o), scaled so that max|o| = Λ (all 0 when max|o| = 0)."""
    if not ratios:
        return []
    mean = math.fsum(ratios) / len(ratios)
    o = [float(r) - mean for r in ratios]
    peak = max(abs(v) for v in o)
    return [0.0] * len(o) if peak == 0.0 else [v * adjust / peak for v in o]


def matrix_adjustments(ratios: Sequence[float], numels: Sequence[int], adjust: float) -> list[float]:
    """Matrix-level offsets: a / mean(a), centred by the numel-weighted mean, scaled to max|a| = Λ."""
    if not ratios:
        return []
    a = [float(r) for r in ratios]
    mean = math.fsum(a) / len(a)
    if mean != 0.0:
        a = [v / mean for v in a]
    centre = math.fsum(v * n for v, n in zip(a, numels, strict=True)) / sum(numels)
    a = [v - centre for v in a]
    peak = max(abs(v) for v in a)
    return [0.0] * len(a) if peak == 0.0 else [v * adjust / peak for v in a]


def dp_offsets(
    block_ratios: Mapping[Hashable, float],
    matrix_ratios: Mapping[str, float],
    numels: Mapping[str, int],
    block_of: Mapping[str, Hashable],
    adjust: float,
) -> tuple[dict[Hashable, float], dict[str, float]]:
    """DP's density offsets of one expert: ({block: o_i}, {matrix: o_{block(j)} + a_j}).

    A matrix's density is then ``density + offset`` (before clamping), its block's ``density + o_i``.
    Blocks and matrices are processed in sorted order, so the result does not depend on input order.
    """
    blocks = sorted(block_ratios)
    o = dict(zip(blocks, layer_adjustments([block_ratios[b] for b in blocks], adjust), strict=True))
    names = sorted(matrix_ratios)
    a = matrix_adjustments([matrix_ratios[n] for n in names], [numels[n] for n in names], adjust)
    return o, {n: o[block_of[n]] + aj for n, aj in zip(names, a, strict=True)}


def prune_mask(delta: Tensor, density: float, *, compat: bool = True) -> Tensor:
    """The keep mask of magnitude pruning at sparsity s = clamp(1 − density, 0, 1).

    ``compat=True`` (reference): idx = ⌊n·s⌋; keep |δ| > sort(|δ|)[idx], nothing when idx >= n.
    ``compat=False``: keep exactly n − ⌊n·s⌋ entries by |δ| (stable, ties to the lower index).
    """
    n = delta.numel()
    s = min(max(1.0 - float(density), 0.0), 1.0)
    idx = math.floor(n * s)
    if idx >= n:
        return torch.zeros_like(delta, dtype=torch.bool)
    a = delta.detach().abs()
    if compat:
        thr = torch.kthvalue(a.flatten(), idx + 1).values
        return a > thr
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    order = torch.sort(a.flatten(), descending=True, stable=True).indices
    mask[order[: n - idx]] = True
    return mask.view_as(delta)


def dpa_amplify(
    delta: Tensor, keep_top_mask: Tensor, keep_band_mask: Tensor, alpha_top: float, alpha_band: float
) -> Tensor:
    """DPA: max(α_top, α_band)·δ on the top partition, α_band·δ on the band, 0 elsewhere (α >= 0).

    ``keep_top_mask`` is the mask kept at the high sparsity; ``keep_band_mask`` the mask kept at the
    low sparsity (it may include the top entries or not: their union is the lower-sparsity set).
    """
    if alpha_top < 0 or alpha_band < 0:
        raise ConfigError(f"dppa: amplification factors must be >= 0, got alpha_top={alpha_top}, "
                          f"alpha_band={alpha_band}")
    top = keep_top_mask.to(torch.bool)
    low = top | keep_band_mask.to(torch.bool)
    zero = torch.zeros_like(delta)
    return torch.where(top, delta * max(alpha_top, alpha_band), torch.where(low, delta * alpha_band, zero))


# ------------------------------------------------------------------------------------- statistics

@dataclass
class DPExpertStatistics:
    """DP's results for one expert (densities before clamping; keep fraction = density).

    Attributes:
        block_ratio: block outlier ratio o_i (percent, M_layer) per (stack, block index).
        block_offset: o_i after centring and scaling to ±Λ.
        matrix_ratio: matrix outlier ratio a_j (percent, M_mat) per tensor.
        matrix_offset: o_{block(j)} + a_j per tensor.
        density_top: d_j at ``density_top`` per tensor.
        density_band: d_j at ``density_band`` per tensor.
    """

    block_ratio: dict[BlockKey, float] = field(default_factory=dict)
    block_offset: dict[BlockKey, float] = field(default_factory=dict)
    matrix_ratio: dict[str, float] = field(default_factory=dict)
    matrix_offset: dict[str, float] = field(default_factory=dict)
    density_top: dict[str, float] = field(default_factory=dict)
    density_band: dict[str, float] = field(default_factory=dict)


def _resolve(value: PerExpert, expert: int) -> float:
    return float(value[expert]) if isinstance(value, (list, tuple)) else float(value)


def _pairs(a: PerExpert, b: PerExpert) -> list[tuple[float, float]]:
    n = max(len(v) if isinstance(v, (list, tuple)) else 1 for v in (a, b))
    return [(_resolve(a, i if isinstance(a, (list, tuple)) else 0),
             _resolve(b, i if isinstance(b, (list, tuple)) else 0)) for i in range(n)]


# ----------------------------------------------------------------------------------------- method

@dataclass(frozen=True, kw_only=True)
class DPPA(DeltaMethod):
    """DPPA: dynamic (outlier-weighted) pruning at two sparsities, partition amplification, combine.

    Attributes:
        density_top: keep fraction of the high-sparsity pruning, 1 − S_hi (reference S_hi = 0.9).
        density_band: keep fraction of the low-sparsity pruning, 1 − S_lo (reference S_lo = 0.8);
            the band partition is what it keeps beyond ``density_top``.
        density_adjust: Λ (the reference's ``Lamda``), the largest ± density offset at each of the
            block and matrix levels.
        layer_outlier_multiple: M_layer, the outlier multiple of the block ratios (reference: 3, hard-coded).
        matrix_outlier_multiple: M_mat, the outlier multiple of the matrix ratios (reference ``Hyper_m`` = 5).
        alpha_top: α_hi (reference ``nine_ratio``, 1.8), the amplification of the top partition.
        alpha_band: α_lo (reference ``eight_ratio``, 0.0), the amplification of the band partition.
        amplify_unpruned: amplify the unpruned tensors (embeddings, norms, lm_head) by
            max(alpha_top, alpha_band), as the reference does.
        dppa_compat: the reference's threshold pruning (keeps n − ⌊n·s⌋ − 1, ties pruned) instead of exact-k.
        combination: ``"task_arithmetic"`` (Σ_t w_t δ_amp,t) or ``"ties"`` (elect + disjoint mean).
            (Not named ``combine``: that is :meth:`DeltaMethod.combine`.)
        zero_sign: the elected sign where the sum is 0 (``combination="ties"`` only).
        lambda_: the post-merge scale λ.
    """

    name = "dppa"
    contract = Contract()
    reference = 'Zhu et al. 2024, DPPA: pruning and amplification (arXiv:2403.02799)'
    statistics_passes = 2
    per_expert_params = ("density_top", "density_band", "alpha_top", "alpha_band")

    density_top: PerExpert = 0.1
    density_band: PerExpert = 0.2
    density_adjust: float = 0.08
    layer_outlier_multiple: float = 3.0
    matrix_outlier_multiple: float = 5.0
    alpha_top: PerExpert = 1.8
    alpha_band: PerExpert = 0.0
    amplify_unpruned: bool = True
    dppa_compat: bool = True
    combination: Literal["task_arithmetic", "ties"] = "task_arithmetic"
    zero_sign: ZeroSign = "positive"

    def __post_init__(self) -> None:
        super().__post_init__()
        hint = "densities are keep fractions: density_top = 1 - S_hi (0.1), density_band = 1 - S_lo (0.2)"
        check_range(self.name, "density_top", self.density_top, 0.0, 1.0, hint=hint)
        check_range(self.name, "density_band", self.density_band, 0.0, 1.0, hint=hint)
        for top, band in _pairs(self.density_top, self.density_band):
            if top > band:
                raise ConfigError(
                    f"{self.name}: parameter 'density_top' = {top} exceeds 'density_band' = {band}; the top "
                    "partition is the higher-sparsity pruning, so density_top <= density_band"
                )
        check_range(self.name, "density_adjust", self.density_adjust, 0.0, 1.0,
                    hint="Λ, the largest density offset per level (reference 0.08)")
        check_range(self.name, "layer_outlier_multiple", self.layer_outlier_multiple, 0.0, math.inf,
                    lo_open=True)
        check_range(self.name, "matrix_outlier_multiple", self.matrix_outlier_multiple, 0.0, math.inf,
                    lo_open=True)
        check_range(self.name, "alpha_top", self.alpha_top, 0.0, math.inf, hint="α_hi (reference 1.8)")
        check_range(self.name, "alpha_band", self.alpha_band, 0.0, math.inf, hint="α_lo (reference 0.0)")
        check_choice(self.name, "combination", self.combination, ("task_arithmetic", "ties"))
        check_choice(self.name, "zero_sign", self.zero_sign, ("positive", "majority"))
        if self.combination == "ties":
            object.__setattr__(self, "allow_negative_weights", False)

    # ---- statistics
    def init_statistics(self) -> dict[str, Any]:
        return {"records": {}}

    def observe(self, stats: dict[str, Any], pass_index: int, inputs: TensorInputs) -> None:
        if not inputs.tensors or not is_prunable(inputs.name, inputs.tensors[0].dim()):
            return
        blk = block_key(inputs.name)
        recs = stats["records"].setdefault(inputs.name, {})
        for i, d in enumerate(inputs.tensors):
            e = inputs.experts[i]
            a = d.detach().abs()
            if pass_index == 0:
                total = float(a.sum(dtype=torch.float64))
                n = a.numel()
                mean = total / n if n else 0.0
                count = int((a > self.matrix_outlier_multiple * mean).sum()) if mean > 0 else 0
                recs[e] = {"block": blk, "n": n, "abs_sum": total, "matrix_count": count}
            else:
                bmean = stats["block_mean"][e][blk]
                count = int((a > self.layer_outlier_multiple * bmean).sum()) if bmean > 0 else 0
                recs.setdefault(e, {})["layer_count"] = count

    def combine_statistics(self, parts: list[Any], pass_index: int) -> dict[str, Any]:
        out = {k: v for k, v in parts[0].items() if k != "records"}
        out["records"] = {}
        for part in parts:
            for name, recs in part["records"].items():
                dst = out["records"].setdefault(name, {})
                for e, rec in recs.items():
                    dst.setdefault(e, {}).update(rec)
        return out

    def finish_pass(self, stats: dict[str, Any], pass_index: int) -> dict[str, Any]:
        per_expert: dict[int, dict[str, dict[str, Any]]] = {}
        for name in sorted(stats["records"]):
            for e, rec in stats["records"][name].items():
                per_expert.setdefault(e, {})[name] = rec
        if pass_index == 0:
            stats["block_mean"] = {}
            for e, recs in per_expert.items():
                sums: dict[BlockKey, list[float]] = {}
                counts: dict[BlockKey, int] = {}
                for rec in recs.values():
                    sums.setdefault(rec["block"], []).append(rec["abs_sum"])
                    counts[rec["block"]] = counts.get(rec["block"], 0) + rec["n"]
                stats["block_mean"][e] = {
                    b: (math.fsum(sums[b]) / counts[b] if counts[b] else 0.0) for b in sums
                }
            return stats
        stats["experts"] = {}
        for e, recs in sorted(per_expert.items()):
            st = DPExpertStatistics()
            lc: dict[BlockKey, int] = {}
            ln: dict[BlockKey, int] = {}
            for name, rec in recs.items():
                lc[rec["block"]] = lc.get(rec["block"], 0) + rec["layer_count"]
                ln[rec["block"]] = ln.get(rec["block"], 0) + rec["n"]
                st.matrix_ratio[name] = 100.0 * rec["matrix_count"] / rec["n"] if rec["n"] else 0.0
            st.block_ratio = {b: (100.0 * lc[b] / ln[b] if ln[b] else 0.0) for b in sorted(lc)}
            st.block_offset, st.matrix_offset = dp_offsets(
                st.block_ratio, st.matrix_ratio, {n: r["n"] for n, r in recs.items()},
                {n: r["block"] for n, r in recs.items()}, self.density_adjust,
            )
            top, band = _resolve(self.density_top, e), _resolve(self.density_band, e)
            st.density_top = {n: top + off for n, off in st.matrix_offset.items()}
            st.density_band = {n: band + off for n, off in st.matrix_offset.items()}
            stats["experts"][e] = st
            if st.density_top:
                log.info("dppa: expert %d: %d prunable matrices in %d blocks; density_top in [%.4g, %.4g], "
                         "density_band in [%.4g, %.4g]", e, len(recs), len(st.block_ratio),
                         min(st.density_top.values()), max(st.density_top.values()),
                         min(st.density_band.values()), max(st.density_band.values()))
        return stats

    @staticmethod
    def matrix_densities(
        stats: dict[str, Any], *, clamp: bool = True
    ) -> dict[str, dict[int, tuple[float, float]]]:
        """Per prunable tensor and expert: (density at density_top, density at density_band), clamped
        to [0, 1] unless ``clamp=False``."""
        out: dict[str, dict[int, tuple[float, float]]] = {}
        for e, st in sorted(stats.get("experts", {}).items()):
            for name in st.density_top:
                top, band = st.density_top[name], st.density_band[name]
                if clamp:
                    top, band = min(max(top, 0.0), 1.0), min(max(band, 0.0), 1.0)
                out.setdefault(name, {})[e] = (top, band)
        return dict(sorted(out.items()))

    # ---- merge
    def amplified(self, inputs: TensorInputs) -> list[Tensor]:
        """δ_amp of each entry of ``inputs`` (DP at both densities, then DPA)."""
        prunable = bool(inputs.tensors) and is_prunable(inputs.name, inputs.tensors[0].dim())
        out = []
        for i, d in enumerate(inputs.tensors):
            a_top, a_band = inputs.per_expert(self.alpha_top, i), inputs.per_expert(self.alpha_band, i)
            if not prunable:
                out.append(d * max(a_top, a_band) if self.amplify_unpruned else d)
                continue
            top, band = self.masks(inputs, i, d)
            out.append(dpa_amplify(d, top, band, a_top, a_band))
        return out

    def masks(self, inputs: TensorInputs, i: int, d: Tensor) -> tuple[Tensor, Tensor]:
        """(top, band) keep masks of entry ``i`` (delta ``d``) from the statistics passes' densities."""
        e = inputs.experts[i]
        st = (inputs.stats or {}).get("experts", {}).get(e) if isinstance(inputs.stats, dict) else None
        if st is None or inputs.name not in st.density_top:
            raise MergeError(
                f"dppa: no pruning statistics for tensor '{inputs.name}' of expert {e}; run the "
                "statistics passes over every tensor first (engine.compute_statistics, or run_plan "
                "which does it)"
            )
        return (prune_mask(d, st.density_top[inputs.name], compat=self.dppa_compat),
                prune_mask(d, st.density_band[inputs.name], compat=self.dppa_compat))

    def combine(self, inputs: TensorInputs) -> Tensor:
        x = self.amplified(inputs)
        if self.combination == "ties":
            return elect_and_fuse(x, inputs.weights, zero_sign=self.zero_sign, consume=True)
        return weighted_sum(x, inputs.weights)


__all__ = [
    "DPExpertStatistics",
    "DPPA",
    "block_key",
    "dp_offsets",
    "dpa_amplify",
    "is_prunable",
    "layer_adjustments",
    "matrix_adjustments",
    "outlier_ratio",
    "prune_mask",
]
