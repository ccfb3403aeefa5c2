"""Small stateless tensor kernels shared by the merge methods (spec: algorithms.md §0.4, §1).

Every kernel is pure: no I/O, no global RNG. Randomness comes from a generator built by
:func:`generator_for`, seeded by (seed, tensor name, expert index), so a result never depends on
the order tensors are processed in, on the device count or on the rank that computes it.

Notation: ``deltas`` is a list of T tensors δ_t of one shape (float32), ``weights`` the per-expert
weights w_t.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

ZeroSign = Literal["positive", "majority"]
RescaleMode = Literal["inverse_prob", "l1", "l2", "linf", "none"]


def seed_for(seed: int, name: str, expert: int) -> int:
    """A 63-bit seed derived from (global seed, tensor name, expert index) by BLAKE2b."""
    digest = hashlib.blake2b(f"{seed}\x00{name}\x00{expert}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator_for(seed: int, name: str, expert: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded by :func:`seed_for`.

    CPU and CUDA generators produce different streams for the same seed: results are reproducible
    per device type, not across device types.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed_for(seed, name, expert))
    return gen


def topk_mask(x: Tensor, density: float) -> Tensor:
    """Boolean mask keeping exactly k = ⌊density·n⌋ entries of largest |x| (spec §1.2).

    Ties in |x| go to the lower flat index (as a stable descending sort would), so the result is
    deterministic. Runs in O(n): the k-th largest |x| comes from ``kthvalue``; entries strictly
    above it are kept, then the first (by index) entries equal to it fill up to k.
    ``density >= 1`` keeps everything, ``k == 0`` keeps nothing.
    """
    n = x.numel()
    if density >= 1.0:
        return torch.ones_like(x, dtype=torch.bool)
    k = int(density * n)
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    a = x.detach().abs().flatten()
    thr = torch.kthvalue(a, n - k + 1).values
    mask = a > thr
    need = k - int(mask.sum())
    if need > 0:
        tied = torch.nonzero(a == thr).flatten()[:need]
        mask[tied] = True
    return mask.view_as(x)


def threshold_mask(x: Tensor, density: float) -> Tensor:
    """The official TIES trim (``topk_values_mask``): keep |x| >= the (n - ⌊n·density⌋)-th smallest |x|.

    Keeps ⌊n·density⌋ + 1 entries when magnitudes are distinct, more when tied (spec §1.2).
    """
    if density >= 1.0:
        return torch.ones_like(x, dtype=torch.bool)
    a = x.detach().abs().flatten()
    kth = a.numel() - int(a.numel() * density)
    if kth <= 0:
        return torch.ones_like(x, dtype=torch.bool)
    thr = torch.kthvalue(a, kth).values
    return (x.abs() >= thr).view_as(x)


def elect_sign(stack: Tensor, weights: Tensor, zero_sign: ZeroSign = "positive") -> Tensor:
    """The elected sign γ = sign(Σ_t w_t X_t), with S = 0 mapped to +1 (spec §1.3).

    ``stack`` is [T, ...]; ``weights`` is [T]. With ``zero_sign="majority"`` an entry where S = 0
    takes the sign of the sum of all elected signs of the tensor (official TIES's rule).
    """
    total = (stack * _bcast(weights, stack)).sum(0)
    gamma = torch.where(total >= 0, 1.0, -1.0).to(stack.dtype)
    if zero_sign == "majority":
        zero = total == 0
        if bool(zero.any()):
            majority = 1.0 if float(torch.sign(total).sum()) >= 0 else -1.0
            gamma = torch.where(zero, torch.full_like(gamma, majority), gamma)
    return gamma


def agreement_mask(stack: Tensor, gamma: Tensor) -> Tensor:
    """A_t = (sign(X_t) == γ); zero entries are never elected."""
    return torch.sign(stack) == gamma.unsqueeze(0)


def disjoint_mean(stack: Tensor, mask: Tensor, weights: Tensor) -> Tensor:
    """Δ = Σ_t A_t w_t X_t / Σ_t A_t w_t with a zero denominator replaced by 1 (spec §1.4)."""
    w = _bcast(weights, stack)
    num = (stack * w * mask).sum(0)
    den = (w * mask).sum(0)
    den = torch.where(den == 0, torch.ones_like(den), den)
    return num / den


def weighted_sum(stack: Tensor, weights: Tensor) -> Tensor:
    """Δ = Σ_t w_t X_t."""
    return (stack * _bcast(weights, stack)).sum(0)


def weighted_mean(stack: Tensor, weights: Tensor) -> Tensor:
    """Δ = Σ_t w_t X_t / Σ_t w_t, with |Σ w| < 1e-8 replaced by 1 (mergekit's guard, spec §9.7)."""
    total = float(weights.sum())
    return weighted_sum(stack, weights) / (1.0 if abs(total) < 1e-8 else total)


def norm_rescale(kept: Tensor, original: Tensor, mode: RescaleMode) -> Tensor:
    """Rescale a sparsified tensor so its ``mode`` norm matches the original's (mergekit ≥ 2025).

    Returns ``kept`` unchanged when either norm is below 1e-7 (mergekit's guard, spec §9.5).
    ``inverse_prob`` and ``none`` are handled by the caller and return ``kept`` here.
    """
    if mode in ("inverse_prob", "none"):
        return kept
    ord_ = {"l1": 1, "l2": 2, "linf": float("inf")}[mode]
    n_orig = torch.linalg.vector_norm(original.flatten(), ord=ord_)
    n_kept = torch.linalg.vector_norm(kept.flatten(), ord=ord_)
    if float(n_orig) < 1e-7 or float(n_kept) < 1e-7:
        return kept
    return kept * (n_orig / n_kept)


def bernoulli_keep(keep_prob: Tensor | float, like: Tensor, gen: torch.Generator) -> Tensor:
    """A boolean keep mask with P(keep_i) = keep_prob_i, drawn with ``gen`` (float32 uniforms)."""
    u = torch.rand(like.shape, generator=gen, device=like.device, dtype=torch.float32)
    return u < keep_prob


def stack(tensors: Sequence[Tensor]) -> Tensor:
    """Stack T same-shape tensors into [T, ...] (float32)."""
    return torch.stack([t.to(torch.float32) for t in tensors], 0)


def as_weights(weights: Sequence[float], like: Tensor) -> Tensor:
    """Per-expert weights as a float32 tensor on ``like``'s device."""
    return torch.tensor(list(weights), dtype=torch.float32, device=like.device)


def _bcast(weights: Tensor, stack: Tensor) -> Tensor:
    return weights.view(-1, *([1] * (stack.dim() - 1)))
