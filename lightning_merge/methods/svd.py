"""What the SVD merges share (TSV-M in :mod:`.tsv`, Iso-C and Iso-CTS in :mod:`.isotropic`).

Per tensor, with task vectors δ_t = θ_t − θ₀ (t = 1..T) and per-expert weights w_t:

    δ'_t = w_t δ_t                                  the weights scale the task vectors first
    2-D tensor (m × n, r = min(m, n)), svd=True:    Δ = the method's matrix rule on δ'_1..δ'_T
    any other tensor, or svd=False:                 Δ = (1/T) Σ_t δ'_t        (the mean)
    θ*  = θ₀ + λ Δ                                  λ: the papers' α (``lambda_``)

Choices the papers leave open, taken from the reference code (FusionBench 0.2.33
``fusion_bench/method/task_singular_vector`` and ``isotropic_merging``, identical there to the
authors' repositories AntoAndGar/task_singular_vectors and danielm1405/iso-merging):

* Every 2-D tensor is a matrix, embeddings and ``lm_head`` included (the references exclude
  only what ``exclude_keys`` names; the authors' code CLIP's ``text_projection``). Here
  ``svd=False`` for a tensor (``tensor_params`` or a YAML filter) merges it by the mean instead.
* Non-2-D tensors take the *mean* of the task vectors (not the sum), then λ.
* The weights: FusionBench's TSV-M takes a list α (one per task) as a scale of each task vector
  before anything else; the same rule is used for all three methods here (all weights 1: the
  references exactly).
* T counts the experts that have the tensor (all of them, in the references).

Orthogonalisation ("whitening"). The polar factor of a matrix A with thin SVD A = P S Qᵀ is
polar(A) = P Qᵀ, the matrix with orthonormal columns (or rows) nearest to A in the Frobenius
norm. It is unique when A has full rank; then it does not depend on the signs or order LAPACK
gives to singular vectors (polar(A D) = polar(A) D for any signed permutation D).

Rank-deficient inputs. Singular vectors of zero (or numerically zero) singular values are
whatever the SVD routine returns (CPU and CUDA differ). They carry weight in these methods: in
Iso-C / Iso-CTS the flat spectrum gives each of the r directions the same σ̄, and in TSV-M the
kept vectors of every task enter the orthogonalisation. Task vectors of LoRA adapters (rank ≪ r)
and exactly repeated experts are such inputs: the result then depends on those arbitrary
vectors, exactly as in the references. A warning is logged (once per method, then at DEBUG per
tensor) when a singular value that enters the result is below ``max(m, n) · ε₃₂ · σ_max``.

SVD routine. ``torch.linalg.svd(full_matrices=False)`` in float32 on the compute device. A
randomized truncated SVD (``torch.svd_lowrank``) is not used: Iso-C needs the whole spectrum,
Iso-CTS the top 80 % of it, and TSV-M the top 1/T of each task's; measured on 1024 × 1024
matrices with a fine-tune-like decaying spectrum (float32, one thread), ``svd_lowrank(q = k + 10,
niter = 2)`` saved 25 % of the time at k = r/2 with a 1.9 % relative error of the rank-k part,
and 75 % at k = r/8 with a 22 % error: not an approximation a merge can take silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import DeltaMethod, TensorInputs

__all__ = ["SVD_NOTES", "SvdMerge", "mean_of", "polar", "thin_svd", "undetermined_below", "warn_undetermined"]

#: this module's notes, appended to each SVD method's docstring (so ``help()`` shows them)
SVD_NOTES = "Shared by the SVD merges (lightning_merge.methods.svd):\n\n" + __doc__.split("\n\n", 1)[1]

log = logging.getLogger(__name__)
_WARNED: set[str] = set()


def thin_svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """a = U diag(S) Vh with U: m × r, S: r (descending), Vh: r × n, r = min(m, n)."""
    return torch.linalg.svd(a, full_matrices=False)


def polar(a: Tensor) -> tuple[Tensor, Tensor]:
    """The polar factor P Qᵀ of ``a`` (thin SVD a = P S Qᵀ) and the singular values S."""
    p, s, qh = thin_svd(a)
    return p @ qh, s


def undetermined_below(shape: torch.Size | tuple[int, ...], s_max: float) -> float:
    """The singular value below which its vectors are numerically arbitrary:
    ``max(m, n) · ε₃₂ · σ_max`` (NumPy's ``matrix_rank`` tolerance)."""
    return max(shape) * torch.finfo(torch.float32).eps * s_max


def warn_undetermined(method: str, tensor: str, what: str) -> None:
    """Log that the result for ``tensor`` depends on arbitrary singular vectors (a warning the
    first time for ``method`` in this process, then at DEBUG)."""
    msg = (f"{method}: tensor '{tensor}': {what}; the directions of those singular values are "
           "arbitrary (the SVD routine's choice), so this tensor's result depends on them, as in the "
           "reference code (typical of LoRA adapters or repeated experts)")
    if method in _WARNED:
        log.debug(msg)
    else:
        _WARNED.add(method)
        log.warning(msg + " [further tensors are logged at DEBUG]")


def mean_of(deltas: list[Tensor]) -> Tensor:
    """(1/T) Σ_t δ_t, accumulated into ``deltas[0]`` (the method's own tensor)."""
    out = deltas[0]
    for d in deltas[1:]:
        out.add_(d)
    return out.div_(len(deltas))


@dataclass(frozen=True, kw_only=True)
class SvdMerge(DeltaMethod):
    """Base of the SVD merges: weights, the mean for non-2-D tensors, the matrix rule otherwise.

    Attributes:
        svd: True (default): a 2-D tensor is merged by the method's SVD rule; False: by the mean
            of the task vectors, like a non-2-D tensor (the references' ``exclude_keys``; set it
            for some tensors only with ``tensor_params`` or a YAML filter, e.g. the embeddings).
    """

    svd: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.svd, bool):
            raise ConfigError(f"{self.name}: parameter 'svd' must be True or False, got {self.svd!r}")

    def combine(self, inputs: TensorInputs) -> Tensor:
        deltas = inputs.tensors  # the method's own tensors: scaled in place
        for i, d in enumerate(deltas):
            w = inputs.weights[i]
            if w != 1.0:
                d.mul_(w)
        if self.svd and deltas[0].dim() == 2 and deltas[0].numel() > 0:
            return self.combine_matrix(deltas, inputs.name)
        return mean_of(deltas)

    def combine_matrix(self, deltas: list[Tensor], name: str) -> Tensor:
        """Δ of one matrix from the weighted task vectors δ'_t (a new tensor; ``deltas`` may be
        consumed)."""
        raise NotImplementedError
