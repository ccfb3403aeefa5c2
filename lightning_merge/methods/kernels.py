"""Small stateless tensor kernels shared by the merge methods (spec: algorithms.md §0.4, §1).

Every kernel is pure: no I/O, no global RNG. Randomness comes from the counter-addressable stream of
(seed, tensor name, expert index) (:mod:`~lightning_merge.methods.rng`; :func:`generator_for` for
the few draws that need a ``torch.Generator``), so a result never depends on the order tensors are
processed in, on the device count or on the rank that computes it.

Notation: ``deltas`` is a list of T tensors δ_t of one shape (float32), ``weights`` the per-expert
weights w_t.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from .fuse import ZeroSign, agreement_mask, elect_and_fuse, elect_sign  # noqa: F401 (re-exported)
from .rng import CHUNK as PARALLEL_MIN
from .rng import RandomStream, thread_pool

RescaleMode = Literal["inverse_prob", "l1", "l2", "linf", "none"]
#: ``finish(block, start)``: the rest of a sparsifier for the flat block [start, start + numel) of its
#: tensor, applied in place inside the fused loop (:func:`~lightning_merge.methods.fuse.elect_and_fuse`)
Finish = Callable[[Tensor, int], Tensor]


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


def sort_rows(a: np.ndarray) -> None:
    """Sort every row of the 2-D numpy array ``a`` in place (ascending), blocks of rows on up to
    ``torch.get_num_threads()`` threads (numpy releases the GIL while it sorts)."""
    rows = a.shape[0]
    parts = max(1, min(torch.get_num_threads(), a.size // PARALLEL_MIN, rows))
    if parts == 1:
        a.sort(axis=1)
        return
    step = -(-rows // parts)
    list(thread_pool(parts).map(lambda r: a[r:r + step].sort(axis=1), range(0, rows, step)))


def all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite (non-float tensors: always).

    One reduction instead of ``isfinite(t).all()`` (a bool tensor, then a second pass; about 20x
    slower on CPU): a sum is finite only if every term is, and a finite sum means all terms are
    finite. Only a sum that overflows (or a non-finite entry) needs the exact check.
    """
    if not t.dtype.is_floating_point:
        return True
    total = t.sum(dtype=torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t.sum()
    if bool(torch.isfinite(total)):
        return True
    return bool(torch.isfinite(t).all())


def kth_largest_bits(bits: Tensor, k: int) -> int:
    """The bit pattern of the k-th largest value among non-negative float32 ``bits`` (1 ≤ k ≤ n).

    On CPU: numpy's ``partition`` (introselect; SIMD quickselect where numpy has one, as on
    AVX-512 and AVX2 hosts), O(n) and about 8x faster than the radix select below on this
    project's benchmark machine. Elsewhere: a radix select in two histogram passes (high 16 bits,
    then the low 16 bits within the chosen bucket), which stays on the device.
    """
    if bits.device.type == "cpu":
        a = bits.detach().contiguous().view(-1).numpy()
        return int(np.partition(a, a.size - k)[a.size - k])
    hi = bits >> 16
    b, above = top_bucket(torch.bincount(hi, minlength=1 << 15), k)
    lo, _ = top_bucket(torch.bincount(bits[hi == b] & 0xFFFF, minlength=1 << 16), k - above)
    return (b << 16) | lo


def topk_threshold(x: Tensor, density: float) -> float | None:
    """The trim of :func:`topk_mask` as a threshold: afterwards ``|x| >= threshold`` keeps exactly
    the entries ``topk_mask(x, density)`` keeps, up to entries equal to 0 (which no fuse elects).

    Entries tied with the k-th largest |x| beyond the k kept are set to 0 in ``x`` (in place: the
    caller owns ``x``), the last ones by index, as :func:`topk_mask` drops them. Returns None when
    ``density >= 1`` (keep everything) and +inf when k = ⌊density·n⌋ = 0.
    """
    n = x.numel()
    if density >= 1.0:
        return None
    k = int(density * n)
    if k <= 0:
        return float("inf")
    if x.device.type != "cpu":
        bits = abs_bits(x).flatten()
        thr = kth_largest_bits(bits, k)
        excess = int(torch.count_nonzero(bits >= thr)) - k
    else:
        part = abs_bits(x).view(-1).numpy()  # a copy of |x| of our own: partitioned in place
        part.partition(n - k)
        thr = int(part[n - k])
        left = part[:n - k]
        excess = int(np.count_nonzero(left == thr)) if left.size and int(left.max()) == thr else 0
    if excess > 0 and thr > 0:
        tied = torch.nonzero(abs_bits(x).view(-1) == thr).flatten()
        x.view(-1)[tied[tied.numel() - excess:]] = 0.0
    return float(torch.tensor(thr, dtype=torch.int32).view(torch.float32))


def topk_thresholds(xs: Sequence[Tensor], densities: Sequence[float]) -> list[float | None]:
    """:func:`topk_threshold` of every tensor, on parallel threads on CPU (numpy releases the GIL)."""
    jobs = list(zip(xs, densities))
    threads = min(len(jobs), torch.get_num_threads())
    if threads <= 1 or xs[0].device.type != "cpu" or xs[0].numel() < PARALLEL_MIN:
        return [topk_threshold(x, d) for x, d in jobs]
    return list(thread_pool(threads).map(lambda job: topk_threshold(*job), jobs))


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


def unchanged(block: Tensor, start: int) -> Tensor:
    """The :data:`Finish` of a sparsifier with nothing left to do."""
    return block


def mask_then_match_norm(delta: Tensor, keep: Tensor, mode: RescaleMode) -> Finish:
    """Apply ``keep`` to ``delta`` in place now and return the :data:`Finish` that scales any block
    so the kept tensor's ``mode`` norm matches the original's (the same guard as
    :func:`rescale_to_norm`: either norm below 1e-7 leaves it as it is)."""
    original = norm_of(delta, mode)
    n_kept = norm_of(delta.mul_(keep), mode)
    if original < 1e-7 or n_kept < 1e-7:
        return unchanged
    factor = original / n_kept
    return lambda b, a: b.mul_(factor)


def bernoulli_keep(keep_prob: Tensor | float, like: Tensor, gen: RandomStream | torch.Generator) -> Tensor:
    """A boolean keep mask with P(keep_i) = keep_prob_i.

    ``gen`` is the :class:`~lightning_merge.methods.rng.RandomStream` of this (seed, tensor, expert)
    (what the methods use: counter-addressable, threaded on CPU) or a ``torch.Generator`` (float32
    uniforms from ``torch.rand``, the draws of lightning_merge 0.1 before the streams).
    """
    if isinstance(gen, RandomStream):
        return gen.keep(keep_prob, like.shape).to(like.device)
    u = torch.rand(like.shape, generator=gen, device=like.device, dtype=torch.float32)
    return u < keep_prob
