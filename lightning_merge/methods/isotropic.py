"""Isotropic merging (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces", ICML 2025, arXiv:2502.04959): Iso-C and Iso-CTS. Delta space, per tensor.

For a matrix (m × n, r = min(m, n)) with weighted task vectors δ'_t = w_t δ_t, t = 1..T:

Iso-C (``iso_c``), isotropic merging in the common subspace:

    Δ_TA = Σ_t δ'_t = U diag(σ) Vᵀ           task arithmetic's sum and its thin SVD
    σ̄    = (1/r) Σ_i σ_i                     the mean of all r singular values
    Δ    = σ̄ U Vᵀ                            a flat ("isotropic") spectrum: σ̄ · polar(Δ_TA)
    θ*   = θ₀ + λ Δ

Iso-CTS (``iso_cts``), with task-specific subspaces added (f = ``common_space_fraction``):

    c₀   = ⌊r · f⌋
    s    = round((r − c₀) / T) · T           the task-specific dimensions, a multiple of T
    c    = r − s,  k = s / T                 the common dimensions, and each task's
    U_c  = U[:, :c], V_c = V[:, :c], σ_c = σ[:c]         the top of Δ_TA's SVD
    δ̂_t  = δ'_t − U_c U_cᵀ δ'_t = Û_t diag(σ̂_t) V̂_tᵀ     each task outside the common column space
    U_cat = [Û_1[:, :k] … Û_T[:, :k]  U_c]   m × r;  V_cat likewise (n × r);
    σ_cat = [σ̂_1[:k] … σ̂_T[:k]  σ_c]
    Δ    = mean(σ_cat) · polar(U_cat) polar(V_cat)ᵀ
    θ*   = θ₀ + λ Δ

Other tensors (and matrices with ``svd=False``): Δ = (1/T) Σ_t δ'_t, for both (see below).

Where the reference code decides (FusionBench 0.2.33 ``iso_c`` / ``iso_cts``, the same as the
authors' repository danielm1405/iso-merging):

* σ̄ averages all r = min(m, n) singular values, zeros included: the nuclear norm is kept,
  ‖Δ‖_* = ‖Δ_TA‖_* (Iso-C). A rank-deficient Δ_TA (LoRA experts) spreads σ̄ over directions it
  does not determine (see below).
* Iso-CTS rounds the task-specific size to a multiple of T with Python's ``round`` (halves to
  even: r = 5, f = 0.8, T = 2 gives s = round(0.5) · 2 = 0, i.e. Iso-C). When that rounding
  exceeds r (only for small f, e.g. r = 3, f = 0, T = 2: s = 4), the reference indexes with a
  negative common size; here s = T ⌊r/T⌋ then.
* Only the column space is projected out (δ'_t − U_c U_cᵀ δ'_t); the row vectors V̂_t come from
  the SVD of that projection. The mean mixes the common σ_c of the sum with the task-specific σ̂_t
  of the individual projected tasks. U_cat holds the task blocks first, then the common block
  (the order does not change Δ).
* f = 1 gives c = r, k = 0: Iso-C. f = 0 keeps no common direction (c = r − s, often 0).
* λ is FusionBench's ``scaling_factor`` (default 1.0; FusionBench's calibrated configs use
  1.5; the authors choose it on validation data from 30 values in (0, 3]). FusionBench's
  ``common_space_fraction`` default, 0.8, is the default here.

Properties. The results are independent of the order of the experts and of the signs of the
singular vectors (for full-rank inputs). Iso-C of one expert is σ̄ U Vᵀ of its task vector, not
the expert (neither method has an identity setting). Zero task vectors give θ₀. Memory: the T
task vectors, one sum, and the SVD factors of one matrix (Iso-CTS: m × r and r × n more).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import check_range, explain
from .svd import SVD_NOTES, SvdMerge, polar, thin_svd, undetermined_below, warn_undetermined
from .yaml_spec import Contract

__all__ = ["IsoC", "IsoCTS", "iso_cts_dims"]


def iso_cts_dims(r: int, n_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(c, k): the common dimensions and each task's, c + T·k = r (the reference's rounding)."""
    c0 = int(r * common_space_fraction)
    specific = round((r - c0) / n_tasks) * n_tasks
    if specific > r:
        specific = (r // n_tasks) * n_tasks
    return r - specific, specific // n_tasks


def _sum(deltas: list[Tensor]) -> Tensor:
    out = deltas[0].clone()
    for d in deltas[1:]:
        out.add_(d)
    return out


@dataclass(frozen=True, kw_only=True)
class IsoC(SvdMerge):
    """Iso-C: task arithmetic's sum with its singular values replaced by their mean."""

    name = "iso_c"
    reference = ("Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and "
                 "Task-Specific Subspaces (Iso-C, ICML 2025, arXiv:2502.04959)")
    contract = Contract(identity=None, typical={})

    def combine_matrix(self, deltas: list[Tensor], name: str) -> Tensor:
        total = deltas[0]
        for d in deltas[1:]:
            total.add_(d)
        u, s, vh = thin_svd(total)
        deltas.clear()
        s_max = float(s[0])
        if s_max == 0.0:
            return total.zero_()
        tol = undetermined_below(total.shape, s_max)
        if float(s[-1]) <= tol:
            warn_undetermined(self.name, name, f"the sum of the task vectors has {int((s <= tol).sum())} of "
                                               f"{s.numel()} singular values 0")
        return (u @ vh).mul_(s.mean())


@dataclass(frozen=True, kw_only=True)
class IsoCTS(SvdMerge):
    """Iso-CTS: Iso-C over the common subspace plus each task's own directions outside it.

    Attributes:
        common_space_fraction: f in [0, 1], the fraction of the r = min(m, n) directions taken
            from the SVD of the sum (the common subspace) before rounding the rest to a multiple of
            T (default 0.8, FusionBench's); 1 gives Iso-C.
    """

    name = "iso_cts"
    reference = ("Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and "
                 "Task-Specific Subspaces (Iso-CTS, ICML 2025, arXiv:2502.04959)")
    contract = Contract(identity=None, typical={"common_space_fraction": 0.5})
    common_space_fraction: float = 0.8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self.name, "common_space_fraction", self.common_space_fraction, 0.0, 1.0,
                    hint="it is the fraction of each matrix's rank given to the common subspace (0.8 in the paper)")

    def combine_matrix(self, deltas: list[Tensor], name: str) -> Tensor:
        n_tasks = len(deltas)
        m, n = deltas[0].shape
        r = min(m, n)
        c, k = iso_cts_dims(r, n_tasks, self.common_space_fraction)
        total = _sum(deltas)
        u, s, vh = thin_svd(total)
        del total
        u_c = u[:, :c]
        u_cat = deltas[0].new_empty(m, r)
        v_cat = deltas[0].new_empty(r, n)  # Vᵀ, as the SVD returns it
        s_cat = deltas[0].new_empty(r)
        for t in range(n_tasks):
            d = deltas[t]
            if k > 0:
                ut, st, vht = thin_svd(d.sub_(u_c @ (u_c.T @ d)))
                u_cat[:, t * k:(t + 1) * k] = ut[:, :k]
                s_cat[t * k:(t + 1) * k] = st[:k]
                v_cat[t * k:(t + 1) * k] = vht[:k]
        deltas.clear()
        u_cat[:, n_tasks * k:] = u_c
        s_cat[n_tasks * k:] = s[:c]
        v_cat[n_tasks * k:] = vh[:c]
        s_max = float(s_cat.max())
        if s_max == 0.0:
            return torch.zeros(m, n, dtype=u_cat.dtype, device=u_cat.device)
        u_orth, su = polar(u_cat)
        v_orth, sv = polar(v_cat)
        tol = undetermined_below((m, n), s_max)
        if float(s_cat.min()) <= tol:
            warn_undetermined(self.name, name, f"{int((s_cat <= tol).sum())} of the {r} singular values are 0")
        elif min(float(su.min()), float(sv.min())) <= undetermined_below((m, n), 1.0):
            warn_undetermined(self.name, name, "the common and task-specific directions are linearly dependent")
        return (u_orth @ v_orth).mul_(s_cat.mean())


explain(IsoC, IsoCTS, math=__doc__ + "\n" + SVD_NOTES)
