"""The merged-tensor arithmetic of the learned merges, with gradients to the coefficients only.

One merged tensor is an affine combination of stored tensors with coefficient tensors that
broadcast against it:

    W = O + Σ_k C_k ⊙ X_k                                           (1)

where ``O`` (optional) is an offset with coefficient 1, the ``X_k`` are frozen stored tensors
(any floating dtype: bf16/fp16 storage is upcast one tensor at a time) and the ``C_k`` are float32
coefficients of a shape that broadcasts to ``W`` (a scalar, a column vector ``[1, in]`` for an
``nn.Linear`` weight ``[out, in]``, an elementwise vector for a norm weight). The gradient of a
loss ℓ with respect to ``C_k`` is

    ∂ℓ/∂C_k = reduce_to_shape(C_k)( ∂ℓ/∂W ⊙ X_k )                    (2)

(sum over the broadcast dimensions). :class:`Combine` implements (1) and (2) by hand so that
autograd keeps only the coefficients for the backward: a plain expression would keep a float32
copy of every upcast ``X_k`` (N extra model copies with bf16 storage). Forward and backward each
hold one float32 temporary of the tensor's size at a time, plus the output.

Both spaces of the learned merges are instances of (1):

* delta space (AdaMerging, per task / per tensor): W = θ₀ + Σ_m λ_m δ_m, i.e. O = θ₀, X_m = δ_m;
  the sum is accumulated from zero and θ₀ added last, in the order of task arithmetic
  (:class:`~lightning_merge.methods.linear.TaskArithmetic`), so equal coefficients λ reproduce it;
* weight space (DAM): W = Σ_m c_m ⊙ θ_m with θ_m = θ₀ + δ_m, i.e.
  W = (Σ_m c_m) ⊙ θ₀ + Σ_m c_m ⊙ δ_m: no offset, X = [θ₀, δ_1, ..., δ_N],
  C = [Σ_m c_m, c_1, ..., c_N] (the sum is formed outside, so autograd routes its gradient).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["Combine", "combine", "reduce_to"]


def reduce_to(grad: Tensor, shape: torch.Size | Sequence[int]) -> Tensor:
    """Sum ``grad`` over the dimensions where ``shape`` (same rank) is 1 and ``grad`` is not."""
    dims = tuple(i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1)
    return grad.sum(dim=dims, keepdim=True) if dims else grad


class Combine(torch.autograd.Function):
    """W = O + Σ_k C[k] ⊙ X_k with a hand-written backward that saves only ``C`` (see the module)."""

    @staticmethod
    def forward(ctx, coeffs: Tensor, offset: Tensor | None, *parts: Tensor) -> Tensor:  # type: ignore[override]
        ref = parts[0] if parts else offset
        assert ref is not None
        out = torch.zeros(ref.shape, dtype=torch.float32, device=ref.device)
        for k, x in enumerate(parts):
            out.addcmul_(x.to(torch.float32), coeffs[k])
        if offset is not None:
            out.add_(offset.to(torch.float32))
        ctx.save_for_backward(coeffs, *parts)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        coeffs, *parts = ctx.saved_tensors
        gc = None
        if ctx.needs_input_grad[0]:
            gc = torch.zeros_like(coeffs)
            for k, x in enumerate(parts):
                gc[k] = reduce_to(grad * x.to(torch.float32), coeffs.shape[1:])
        return (gc, None, *([None] * len(parts)))


def combine(coeffs: Tensor, parts: Sequence[Tensor], offset: Tensor | None = None) -> Tensor:
    """Equation (1) of the module: ``coeffs`` is ``[K, *b]`` with ``b`` broadcastable to the parts
    (same rank as them), ``parts`` the K stored tensors, ``offset`` the optional coefficient-1 term.
    Returns a new float32 tensor; differentiable in ``coeffs`` only."""
    if not parts:
        if offset is None:
            raise ValueError("combine: nothing to combine (no parts and no offset)")
        return offset.to(torch.float32).clone()
    if coeffs.shape[0] != len(parts):
        raise ValueError(f"combine: {coeffs.shape[0]} coefficients for {len(parts)} parts")
    return Combine.apply(coeffs, offset, *parts)
