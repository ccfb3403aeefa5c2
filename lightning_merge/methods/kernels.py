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


def abs_bits(x: Tensor) -> Tensor:
    """The int32 bit patterns of float32 |x|: for finite values they sort exactly like |x|."""
    return x.detach().to(torch.float32).abs().contiguous().view(torch.int32)


def kth_largest_bits(bits: Tensor, k: int) -> int:
    """The bit pattern of the k-th largest value among non-negative float32 ``bits`` (1 ≤ k ≤ n).

    Radix select in two histogram passes (high 16 bits, then the low 16 bits within the chosen
    bucket): O(n) and about twice as fast as ``torch.kthvalue`` on large tensors.
    """
    hi = bits >> 16
    b, above = top_bucket(torch.bincount(hi, minlength=1 << 15), k)
    lo, _ = top_bucket(torch.bincount(bits[hi == b] & 0xFFFF, minlength=1 << 16), k - above)
    return (b << 16) | lo


def top_bucket(hist: Tensor, k: int) -> tuple[int, int]:
    """The highest bucket b whose count together with all higher buckets reaches k (1 ≤ k ≤ Σ hist),
    and the count of the buckets above b: one digit of a radix select."""
    cum = hist.flip(0).cumsum(0).flip(0)  # cum[b] = #(entries in buckets >= b)
    b = int(torch.nonzero(cum >= k).max())
    return b, (int(cum[b + 1]) if b + 1 < cum.numel() else 0)


def topk_mask(x: Tensor, density: float) -> Tensor:
    """Boolean mask keeping exactly k = ⌊density·n⌋ entries of largest |x| (spec §1.2).

    Ties in |x| go to the lower flat index (as a stable descending sort would), so the result is
    deterministic. Runs in O(n): the k-th largest |x| comes from a radix select
    (:func:`kth_largest_bits`); entries strictly above it are kept, then the first (by index)
    entries equal to it fill up to k. ``density >= 1`` keeps everything, ``k == 0`` nothing.
    """
    n = x.numel()
    if density >= 1.0:
        return torch.ones_like(x, dtype=torch.bool)
    k = int(density * n)
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    bits = abs_bits(x).flatten()
    thr = kth_largest_bits(bits, k)
    mask = bits >= thr
    excess = int(torch.count_nonzero(mask)) - k
    if excess > 0:  # entries tied with the k-th largest: keep the first ones by index
        tied = torch.nonzero(bits == thr).flatten()
        mask[tied[tied.numel() - excess:]] = False
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


def elect_sign(stack: Tensor | Sequence[Tensor], weights: Tensor | Sequence[float],
               zero_sign: ZeroSign = "positive") -> Tensor:
    """The elected sign γ = sign(Σ_t w_t X_t), with S = 0 mapped to +1 (spec §1.3).

    ``stack`` is a [T, ...] tensor or a sequence of T tensors; ``weights`` has T entries. With
    ``zero_sign="majority"`` an entry where S = 0 takes the sign of the sum of all elected signs of
    the tensor (official TIES's rule).
    """
    w = weights.tolist() if isinstance(weights, Tensor) else [float(v) for v in weights]
    gamma = torch.zeros_like(stack[0], dtype=torch.float32)
    for t, wt in enumerate(w):
        gamma.add_(stack[t], alpha=wt)
    gamma.sign_()  # the mass S becomes its sign in place; S = 0 stays 0 until the zero rule below
    fill = 1.0
    if zero_sign == "majority":
        fill = 1.0 if float(gamma.sum()) >= 0 else -1.0
    return gamma.masked_fill_(gamma == 0, fill)


def agreement_mask(stack: Tensor, gamma: Tensor) -> Tensor:
    """A_t = (sign(X_t) == γ) for non-negative weights; zero entries are never elected (diagnostics)."""
    return torch.sign(stack) == gamma.unsqueeze(0)


def elect_and_fuse(
    x: Tensor | Sequence[Tensor],
    weights: Tensor | Sequence[float],
    *,
    election: Literal["weighted", "unweighted"] = "weighted",
    divisor: Literal["weights", "count"] = "weights",
    normalize: bool = True,
    zero_sign: ZeroSign = "positive",
    consume: bool = False,
) -> Tensor:
    """Sign election and disjoint fuse over T sparsified deltas (spec §1.3-1.4).

        γ   = sign(Σ_t e_t X_t)  (S = 0 → +1, or the tensor's majority sign)
        A_t = [sign(e_t X_t) = γ]                     zeros are never elected
        Δ   = Σ_t A_t w_t X_t / Σ_t A_t w_t           (normalize; denominator 0 → 1)
        Δ   = Σ_t A_t w_t X_t                         (normalize=False: mergekit's elected sum)

    with e_t = w_t (``election="weighted"``: mergekit, the spec) or 1 (``"unweighted"``: PEFT);
    with ``divisor="count"`` the denominator is Σ_t A_t (PEFT). ``x`` is a [T, ...] tensor or a
    sequence of T tensors, left unchanged unless ``consume=True`` (then it is overwritten, which
    saves one tensor-sized buffer).

    Computed expert by expert without masks: with s_t = sign(e_t), the elected part of X_t is
    γ·s_t·max(γ·s_t·X_t, 0), and [γ·s_t·X_t > 0] = sign(max(γ·s_t·X_t, 0)); the only temporaries
    are a few tensors of one expert's size.
    """
    w = weights.tolist() if isinstance(weights, Tensor) else [float(v) for v in weights]
    e = w if election == "weighted" else [1.0] * len(w)
    gamma = elect_sign(x, e, zero_sign)
    num = torch.zeros_like(gamma)
    den = torch.zeros_like(gamma) if normalize else None
    buffer = None if consume else torch.empty_like(gamma)
    for t in range(len(w)):
        if e[t] == 0.0:
            continue  # sign(0 · X_t) = 0 is never elected
        s = 1.0 if e[t] > 0 else -1.0
        part = x[t].mul_(gamma) if consume else torch.mul(x[t], gamma, out=buffer)
        part.mul_(s).clamp_(min=0)  # |X_t| where elected, else 0
        num.add_(part, alpha=w[t] * s)
        if den is not None:
            den.add_(part.sign_(), alpha=w[t] if divisor == "weights" else 1.0)
    num.mul_(gamma)
    if den is None:
        return num
    return num.div_(den.masked_fill_(den == 0, 1.0))


def weighted_sum(x: Tensor | Sequence[Tensor], weights: Tensor | Sequence[float]) -> Tensor:
    """Δ = Σ_t w_t X_t, accumulated expert by expert (``x``: a [T, ...] tensor or T tensors)."""
    w = weights.tolist() if isinstance(weights, Tensor) else [float(v) for v in weights]
    total = torch.zeros_like(x[0], dtype=torch.float32)
    for t, wt in enumerate(w):
        total.add_(x[t], alpha=wt)
    return total


def weighted_mean(x: Tensor | Sequence[Tensor], weights: Tensor | Sequence[float]) -> Tensor:
    """Δ = Σ_t w_t X_t / Σ_t w_t, with |Σ w| < 1e-8 replaced by 1 (mergekit's guard, spec §9.7)."""
    w = weights.tolist() if isinstance(weights, Tensor) else [float(v) for v in weights]
    total = sum(w)
    return weighted_sum(x, w).div_(1.0 if abs(total) < 1e-8 else total)


def norm_rescale(kept: Tensor, original: Tensor, mode: RescaleMode) -> Tensor:
    """Rescale a sparsified tensor so its ``mode`` norm matches the original's (mergekit ≥ 2025).

    Returns ``kept`` unchanged when either norm is below 1e-7 (mergekit's guard, spec §9.5).
    ``inverse_prob`` and ``none`` are handled by the caller and return ``kept`` here.
    """
    if mode in ("inverse_prob", "none"):
        return kept
    return rescale_to_norm(kept, norm_of(original, mode), mode)


def norm_of(x: Tensor, mode: RescaleMode) -> float:
    """The ``l1`` / ``l2`` / ``linf`` norm of the whole tensor."""
    ord_ = {"l1": 1, "l2": 2, "linf": float("inf")}[mode]
    return float(torch.linalg.vector_norm(x.flatten(), ord=ord_))


def rescale_to_norm(kept: Tensor, target: float, mode: RescaleMode) -> Tensor:
    """Scale ``kept`` in place so that its ``mode`` norm becomes ``target`` (guard: norms < 1e-7)."""
    n_kept = norm_of(kept, mode)
    if target < 1e-7 or n_kept < 1e-7:
        return kept
    return kept.mul_(target / n_kept)


def bernoulli_keep(keep_prob: Tensor | float, like: Tensor, gen: torch.Generator) -> Tensor:
    """A boolean keep mask with P(keep_i) = keep_prob_i, drawn with ``gen`` (float32 uniforms)."""
    u = torch.rand(like.shape, generator=gen, device=like.device, dtype=torch.float32)
    return u < keep_prob
