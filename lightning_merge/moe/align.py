"""Neuron alignment: permute an expert's intermediate units to match a reference expert.

An expert ``down · (act(gate x) ⊙ up x)`` computes the same function after any permutation P of its
I intermediate units applied to the rows of ``gate`` and ``up`` and the columns of ``down``
(:meth:`~lightning_merge.moe.arch.Expert.permuted`). Before a group is averaged, each member is
permuted to its group's dominant expert by a linear assignment (``scipy.optimize.linear_sum_assignment``,
maximising):

* ``"weight"`` (the authors' ``compute_switch_permutation_by_weight_matching`` with
  ``include_wo=True``, which their merge uses): the score of pairing reference unit a with member
  unit b is ⟨gate_ref[a], gate[b]⟩ + ⟨up_ref[a], up[b]⟩ + ⟨down_ref[:, a], down[:, b]⟩, i.e.
  C = G_r Gᵀ + U_r Uᵀ + D_rᵀ D, so the assignment minimises Σ‖W_ref − W_member P‖² over all three
  matrices;
* ``"activation"`` (their ``compute_switch_permutation_by_activation_matching``): the Pearson
  correlation between the units' activations h = act(gate x) ⊙ up x over calibration tokens x
  routed to either expert (the tokens kept by the routing statistics, ``keep_tokens``), with the
  authors' ε = 1.19e-7 in the denominator; fewer than 2 tokens gives the identity.

The assignment's ``perm`` maps: unit i of the aligned member is the member's unit perm[i].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .arch import Expert

__all__ = ["activation_permutation", "align_to", "weight_permutation"]

EPS = 1.1920928955078125e-07  # the authors' FP32_EPS


def _assign(score: Tensor) -> Tensor:
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(score.double().cpu().numpy(), maximize=True)
    perm = torch.empty(score.shape[0], dtype=torch.long)
    perm[torch.from_numpy(rows)] = torch.from_numpy(cols)
    return perm


def weight_permutation(ref: Expert, member: Expert) -> Tensor:
    """perm maximising Σ_a C[a, perm[a]] with C = G_r Gᵀ + U_r Uᵀ + D_rᵀ D (module doc)."""
    score = ref.gate.double() @ member.gate.double().T + ref.up.double() @ member.up.double().T
    score += ref.down.double().T @ member.down.double()
    return _assign(score)


def _hidden(e: Expert, x: Tensor, act: nn.Module) -> Tensor:
    return act(x @ e.gate.T) * (x @ e.up.T)


def activation_permutation(ref: Expert, member: Expert, tokens: Tensor, act: nn.Module) -> Tensor:
    """perm maximising the summed correlation of matched units' activations on ``tokens`` [n, H]."""
    n = tokens.shape[0]
    if n < 2:
        return torch.arange(ref.gate.shape[0])
    x = tokens.float()
    a, b = _hidden(ref, x, act).double(), _hidden(member, x, act).double()
    a, b = a - a.mean(0, keepdim=True), b - b.mean(0, keepdim=True)
    cov = a.T @ b / (n - 1)
    std_a, std_b = a.pow(2).sum(0).div(n - 1).sqrt(), b.pow(2).sum(0).div(n - 1).sqrt()
    return _assign(cov / (std_a[:, None] * std_b[None, :] + EPS))


def align_to(ref: Expert, member: Expert, mode: str, tokens: Tensor | None = None,
             act: nn.Module | None = None) -> tuple[Expert, Tensor]:
    """The member permuted to ``ref`` (``mode``: weight / activation / none) and the permutation."""
    if mode == "none":
        perm = torch.arange(member.gate.shape[0])
    elif mode == "weight":
        perm = weight_permutation(ref, member)
    else:
        assert tokens is not None and act is not None
        perm = activation_permutation(ref, member, tokens, act)
    return member.permuted(perm), perm
