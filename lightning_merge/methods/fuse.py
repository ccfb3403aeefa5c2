"""Sign election and disjoint fuse (TIES, DARE-TIES, DELLA, DPPA, breadcrumbs, adaptive-RMS).

Notation: ``x`` holds T sparsified task vectors X_t of one shape (a [T, ...] tensor or T tensors),
``weights`` the per-expert weights w_t.

Performance: the fuse is a chain of about 20 elementwise passes over T tensors. Run over a whole
tensor, each pass streams it from main memory; :func:`elect_and_fuse` instead runs the chain over
blocks of :data:`FUSE_BLOCK` elements that stay in the CPU caches, and lets a method finish its
sparsification of each block (``prepare``) inside the same loop, so the mask-and-rescale passes
are cached too. Every element goes through the same operations in the same order as over the
whole tensor, so the result does not depend on the block size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

ZeroSign = Literal["positive", "majority"]
#: ``prepare(t, block, start)``: finish expert t's sparsified values for the flat element block
#: [start, start + block.numel()) of its tensor, in place on ``block`` (a view of x[t]), and return it
Prepare = Callable[[int, Tensor, int], Tensor]
#: elements per block of the fused loop (1 MiB of float32 per expert: cache-resident, and large
#: enough that the per-operation overhead stays small)
FUSE_BLOCK = 1 << 18


def elect_sign(stack: Tensor | Sequence[Tensor], weights: Tensor | Sequence[float],
               zero_sign: ZeroSign = "positive") -> Tensor:
    """The elected sign γ = sign(Σ_t w_t X_t), with S = 0 mapped to +1 (spec §1.3).

    ``stack`` is a [T, ...] tensor or a sequence of T tensors; ``weights`` has T entries. With
    ``zero_sign="majority"`` an entry where S = 0 takes the sign of the sum of all elected signs of
    the tensor (official TIES's rule).
    """
    w = _floats(weights)
    gamma = torch.zeros_like(stack[0], dtype=torch.float32)
    for t, wt in enumerate(w):
        gamma.add_(stack[t], alpha=wt)
    if zero_sign == "positive":
        # the sum starts from +0.0, so S = 0 is +0.0 (never −0.0) and copysign maps it to +1
        return torch.copysign(torch.ones((), dtype=gamma.dtype, device=gamma.device), gamma, out=gamma)
    gamma.sign_()  # the mass S becomes its sign in place; S = 0 stays 0 until the zero rule below
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
    prepare: Prepare | None = None,
) -> Tensor:
    """Sign election and disjoint fuse over T sparsified deltas (spec §1.3-1.4).

        γ   = sign(Σ_t e_t X_t)  (S = 0 → +1, or the tensor's majority sign)
        A_t = [sign(e_t X_t) = γ]                     zeros are never elected
        Δ   = Σ_t A_t w_t X_t / Σ_t A_t w_t           (normalize; denominator 0 → 1)
        Δ   = Σ_t A_t w_t X_t                         (normalize=False: mergekit's elected sum)

    with e_t = w_t (``election="weighted"``: mergekit, the spec) or 1 (``"unweighted"``: PEFT);
    with ``divisor="count"`` the denominator is Σ_t A_t (PEFT). ``x`` is a [T, ...] tensor or a
    sequence of T tensors, left unchanged unless ``consume=True`` (then it is overwritten, which
    saves one tensor-sized buffer). ``prepare`` (needs ``consume=True``) is applied to every
    expert's block before the election: X_t is then ``prepare``'s output.

    Computed expert by expert without masks: with s_t = sign(e_t), the elected part of X_t is
    γ·s_t·max(γ·s_t·X_t, 0), and [γ·s_t·X_t > 0] = sign(max(γ·s_t·X_t, 0)); the temporaries are a
    few blocks. The majority rule needs the whole tensor's γ first, so it runs unblocked.
    """
    if prepare is not None and not consume:
        raise ValueError("elect_and_fuse: prepare works in place on x and needs consume=True")
    w = _floats(weights)
    e = w if election == "weighted" else [1.0] * len(w)
    shape = x[0].shape
    if zero_sign == "majority":
        flat = [t.reshape(-1) for t in x]
        if prepare is not None:
            flat = [prepare(t, f, 0) for t, f in enumerate(flat)]
        return _fuse(flat, w, e, elect_sign(flat, e, "majority"), divisor, normalize, consume, None).view(shape)
    flat = [t.reshape(-1) for t in x]
    n = flat[0].numel()
    out = torch.empty(n, dtype=torch.float32, device=flat[0].device)
    size = min(n, FUSE_BLOCK)
    scratch = {"gamma": out.new_empty(size), "part": None if consume else out.new_empty(size),
               "den": out.new_empty(size) if normalize else None}
    for a in range(0, n, FUSE_BLOCK):
        b = min(n, a + FUSE_BLOCK)
        block = [f[a:b] for f in flat]
        if prepare is not None:
            block = [prepare(t, blk, a) for t, blk in enumerate(block)]
        gamma = scratch["gamma"][:b - a].zero_()
        for t, et in enumerate(e):
            gamma.add_(block[t], alpha=et)
        torch.copysign(torch.ones((), dtype=gamma.dtype, device=gamma.device), gamma, out=gamma)
        _fuse(block, w, e, gamma, divisor, normalize, consume, scratch, out[a:b])
    return out.view(shape)


def _fuse(x: Sequence[Tensor], w: list[float], e: list[float], gamma: Tensor, divisor: str, normalize: bool,
          consume: bool, scratch: dict | None, num: Tensor | None = None) -> Tensor:
    """Σ_t A_t w_t X_t (÷ Σ_t A_t w_t) for blocks ``x`` with elected sign ``gamma``, into ``num``."""
    m = gamma.numel()
    num = torch.zeros_like(gamma) if num is None else num.zero_()
    den = None
    if normalize:
        den = scratch["den"][:m].zero_() if scratch is not None else torch.zeros_like(gamma)
    buffer = None
    if not consume:
        buffer = scratch["part"][:m] if scratch is not None else torch.empty_like(gamma)
    for t in range(len(w)):
        if e[t] == 0.0:
            continue  # sign(0 · X_t) = 0 is never elected
        s = 1.0 if e[t] > 0 else -1.0
        part = x[t].mul_(gamma) if consume else torch.mul(x[t], gamma, out=buffer)
        if s < 0:
            part.neg_()
        part.clamp_(min=0)  # |X_t| where elected, else 0
        num.add_(part, alpha=w[t] * s)
        if den is not None:
            den.add_(part.sign_(), alpha=w[t] if divisor == "weights" else 1.0)
    num.mul_(gamma)
    if den is None:
        return num
    return num.div_(den.masked_fill_(den == 0, 1.0))


def _floats(weights: Tensor | Sequence[float]) -> list[float]:
    return weights.tolist() if isinstance(weights, Tensor) else [float(v) for v in weights]


__all__ = ["FUSE_BLOCK", "Prepare", "ZeroSign", "agreement_mask", "elect_and_fuse", "elect_sign"]
