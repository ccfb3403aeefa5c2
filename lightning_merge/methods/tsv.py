"""TSV-M, Task Singular Vectors Merge (Gargiulo et al., "Task Singular Vectors: Reducing Task
Interference in Model Merging", CVPR 2025, arXiv:2412.00081). Delta space, per tensor.

For a matrix (m × n, r = min(m, n)) with weighted task vectors δ'_t = w_t δ_t, t = 1..T:

    k        = ⌊r / T⌋            (``rank_fraction`` f given: ⌊r · f⌋, with T·k ≤ r)
    δ'_t     = U_t diag(σ_t) V_tᵀ                         thin SVD of each task vector
    U        = [U_1[:, :k] … U_T[:, :k]]        m × Tk    the top k singular vectors of every task
    V        = [V_1[:, :k] … V_T[:, :k]]        n × Tk
    σ        = [σ_1[:k] … σ_T[:k]]
    U⊥, V⊥   = polar(U), polar(V)                         the nearest orthonormal bases (P Qᵀ of
                                                          the SVD U = P S Qᵀ: the paper's whitening)
    Δ        = U⊥ diag(σ) V⊥ᵀ
    θ*       = θ₀ + λ Δ

Other tensors (and matrices with ``svd=False``): Δ = (1/T) Σ_t δ'_t (see below).

Where the reference code decides (FusionBench 0.2.33 ``compute_and_sum_svd_mem_reduction``, the
same as the authors' code):

* k = ⌊r / T⌋: each task keeps the same number of triplets; T·k may be less than r, and then the
  reference pads U and V with zero columns before the orthogonalisation. Here U and V have only
  the Tk real columns: for full-rank U, V the polar factor of [U, 0] is [polar(U), arbitrary],
  and the arbitrary columns meet σ = 0, so Δ is the same. A matrix with r < T (e.g. one row and
  two experts) keeps nothing: Δ = 0, θ* = θ₀, as in the reference. The reference computes
  ⌊r · (1/T)⌋ in floating point (0 for r = T = 49); here ⌊r / T⌋ exactly.
* ``rank_fraction`` (not in the paper, whose fraction is 1/T) must satisfy f · T ≤ 1, so that
  the Tk columns fit in r.
* The orthogonalisation is the polar factor computed by SVD (FusionBench's and the authors'
  default, ``compute_and_sum_svd_mem_reduction``); their eigendecomposition variant
  (``compute_and_sum_svd_mem_reduction_2``) is not offered.
* λ is FusionBench's float ``alpha`` (default 1.0; the authors choose it on validation data from
  30 values in (0, 3]); FusionBench's list ``alpha`` are the weights w_t here.

Properties. One expert (f = 1) gives θ₀ + λ δ: U and V are already orthonormal. Tasks whose
matrices have mutually orthogonal column spaces and row spaces, each of rank ≤ k, give task
arithmetic θ₀ + λ Σ_t w_t δ_t (the concatenated bases are orthonormal). The result is
independent of the order of the experts and of the signs of the singular vectors (for full-rank
U, V; see below for rank-deficient inputs). Memory: the T task vectors plus (m + n) · Tk
floats and the SVD workspaces of one matrix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import Tensor

from ..errors import ConfigError
from .base import check_range, explain
from .svd import SVD_NOTES, SvdMerge, polar, thin_svd, undetermined_below, warn_undetermined
from .yaml_spec import Contract

__all__ = ["TSVM", "tsv_rank"]

log = logging.getLogger(__name__)


def tsv_rank(r: int, n_tasks: int, rank_fraction: float | None) -> int:
    """k, the number of singular triplets each task keeps of a matrix of r = min(m, n)."""
    return r // n_tasks if rank_fraction is None else int(r * rank_fraction)


@dataclass(frozen=True, kw_only=True)
class TSVM(SvdMerge):
    """TSV-M: each task's top singular vectors, orthogonalised together, with their singular values.

    Attributes:
        rank_fraction: f, the fraction of the r = min(m, n) singular triplets each task keeps,
            k = ⌊r · f⌋. None (default): 1/T, the paper (k = ⌊r / T⌋). Must satisfy
            f · T ≤ 1 (the T·k kept vectors must fit in r); f = 1 with one expert keeps it whole.
    """

    name = "tsv_m"
    reference = ("Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model Merging "
                 "(CVPR 2025, arXiv:2412.00081)")
    contract = Contract(identity={}, typical={"rank_fraction": 0.25})
    rank_fraction: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank_fraction is not None:
            check_range(self.name, "rank_fraction", self.rank_fraction, 0.0, 1.0, lo_open=True,
                        hint="it is the kept fraction of each task's singular triplets; None means 1/T")

    def check_experts(self, n_experts: int) -> None:
        super().check_experts(n_experts)
        self._check_fits(n_experts)

    def _check_fits(self, n_tasks: int) -> None:
        f = self.rank_fraction
        if f is not None and f * n_tasks > 1.0 + 1e-12:
            raise ConfigError(
                f"{self.name}: parameter 'rank_fraction' = {f} with {n_tasks} experts keeps more singular "
                f"vectors (T·f = {f * n_tasks:g} of each matrix's rank) than a matrix has; use at most "
                f"1/{n_tasks} = {1 / n_tasks:.6g}, or None (the paper's 1/T)"
            )

    def combine_matrix(self, deltas: list[Tensor], name: str) -> Tensor:
        n_tasks = len(deltas)
        self._check_fits(n_tasks)
        m, n = deltas[0].shape
        k = tsv_rank(min(m, n), n_tasks, self.rank_fraction)
        if k == 0:
            log.debug("%s: tensor '%s' (%d x %d) keeps no singular vector with %d experts: delta 0",
                      self.name, name, m, n, n_tasks)
            return deltas[0].new_zeros(m, n)
        u_cat = deltas[0].new_empty(m, n_tasks * k)
        v_cat = deltas[0].new_empty(n_tasks * k, n)  # Vᵀ, as the SVD returns it
        s_cat = deltas[0].new_empty(n_tasks * k)
        for t in range(n_tasks):
            u, s, vh = thin_svd(deltas[t])
            u_cat[:, t * k:(t + 1) * k] = u[:, :k]
            s_cat[t * k:(t + 1) * k] = s[:k]
            v_cat[t * k:(t + 1) * k] = vh[:k]
        deltas.clear()  # the task vectors are not needed any more
        s_max = float(s_cat.max())
        if s_max == 0.0:
            return u_cat.new_zeros(m, n)
        u_orth, su = polar(u_cat)
        v_orth, sv = polar(v_cat)
        tol = undetermined_below((m, n), s_max)
        if n_tasks == 1:  # U and V are orthonormal already: polar() returns them, whatever they are
            pass
        elif float(s_cat.min()) <= tol:
            warn_undetermined(self.name, name, f"{int((s_cat <= tol).sum())} of the kept singular values are 0")
        elif min(float(su.min()), float(sv.min())) <= undetermined_below(u_cat.shape, 1.0):
            warn_undetermined(self.name, name, "the tasks' singular vectors are linearly dependent")
        return (u_orth * s_cat) @ v_orth


explain(TSVM, math=__doc__ + "\n" + SVD_NOTES)
