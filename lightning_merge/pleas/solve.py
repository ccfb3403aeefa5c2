"""Step 2 of PLeaS: the merged weights, layer by layer, by least squares.

For a linear layer with input axis (S_A, S_B) and output axis (S'_A, S'_B) (:mod:`.match`), the
combined features of the originals on the calibration data are

    z̃_in  = S_A a + S_B b                                    (the layer's inputs in A and B)
    z̃_out = S'_A (W_A a + c_A) + S'_B (W_B b + c_B)           (its outputs: permuted, averaged)

and the merged layer [W | c] minimises, row by row,

    Σ_rows ‖W z̃_in + c − z̃_out‖² + λ ‖[W | c] − [W₀ | c₀]‖²,   λ = ``ridge`` · mean diag(G)

in closed form: [W | c] = (C + λ W₀)(G + λ I)⁻¹ with G = E[x̃ x̃ᵀ], C = E[z̃_out x̃ᵀ], x̃ = [z̃_in; 1],
both computed from the site's moments E[u uᵀ] (u = [a; b; 1]) and the weights (the outputs are a
linear function of the inputs), in float64. W₀ is the permute-and-average merge ("permutation
alignment alone", :func:`permute_average`), so the regulariser pulls towards it and a layer with
too few calibration rows falls back to it. As the authors' gradient masks do, rows that belong to
A's separate units read only from merged inputs and A's separate inputs (likewise for B); merged
rows read everything. The authors fit the same objective with Adam (400 steps, lr 5e-4, starting
from the permute-and-average model); the closed form is its exact minimiser.

Every other tensor (embeddings, norm weights) is combined like the features: p = S_A p_A + S_B p_B
along its permuted dimension (the average of matched units, separate units kept).

The reported error of a layer is the relative residual ‖W x̃ − z̃_out‖² / ‖z̃_out‖² on the
calibration data (without the ridge term).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from .collect import FeatureStats
from .match import AxisPlan
from .spec import LayerSpec, PLeaSSpec

log = logging.getLogger(__name__)

__all__ = ["LayerFit", "combine_param", "merge_weights", "permute_average", "solve_layer"]


@dataclass
class LayerFit:
    weight: Tensor
    bias: Tensor | None
    error: float  # relative least-squares residual on the calibration data


def _unmerge(s: Tensor) -> Tensor:
    """U [n, width]: U[i, k] = 1 where combined feature k carries unit feature i."""
    return (s != 0).T.to(torch.float64)


def _target_map(ly: LayerSpec, wa: Tensor, ba: Tensor | None, wb: Tensor, bb: Tensor | None,
                pout: AxisPlan) -> tuple[Tensor, Tensor]:
    """T [w_out, 2n+1] with z̃_out = T u, and the combined bias S'_A c_A + S'_B c_B."""
    wa, wb = wa.double(), wb.double()
    bias = torch.zeros(pout.width, dtype=torch.float64)
    if ly.bias:
        assert ba is not None and bb is not None
        bias = pout.sa @ ba.double() + pout.sb @ bb.double()
    return torch.cat([pout.sa @ wa, pout.sb @ wb, bias[:, None]], 1), bias


def permute_average(ly: LayerSpec, wa: Tensor, ba: Tensor | None, wb: Tensor, bb: Tensor | None, pin: AxisPlan,
                    pout: AxisPlan) -> tuple[Tensor, Tensor | None]:
    """W₀ = S'_A W_A U_A + S'_B W_B U_B and c₀ = S'_A c_A + S'_B c_B: the permuted average (ZipIt!/Git
    Re-Basin-style partial merge, the authors' ``build_partial_merge_model``)."""
    w0 = pout.sa @ wa.double() @ _unmerge(pin.sa) + pout.sb @ wb.double() @ _unmerge(pin.sb)
    b0 = (pout.sa @ ba.double() + pout.sb @ bb.double()) if ly.bias else None  # type: ignore[union-attr]
    return w0, b0


def solve_layer(ly: LayerSpec, k: Tensor, wa: Tensor, ba: Tensor | None, wb: Tensor, bb: Tensor | None,
                pin: AxisPlan, pout: AxisPlan, ridge: float) -> LayerFit:
    """The least-squares merge of one layer (module doc); ``k`` = E[u uᵀ] of its input site."""
    n = wa.shape[1]
    w_in, w_out = pin.width, pout.width
    m = torch.zeros(w_in + 1, 2 * n + 1, dtype=torch.float64)
    m[:w_in, :n], m[:w_in, n:2 * n], m[w_in, 2 * n] = pin.sa, pin.sb, 1.0
    t, _ = _target_map(ly, wa, ba, wb, bb, pout)
    g = m @ k @ m.T
    c = t @ k @ m.T
    y2 = torch.einsum("ij,jk,ik->", t, k, t)
    w0, b0 = permute_average(ly, wa, ba, wb, bb, pin, pout)
    full0 = torch.cat([w0, (b0 if b0 is not None else torch.zeros(w_out, dtype=torch.float64))[:, None]], 1)
    vis_a = torch.cat([(pin.sa != 0).any(1), torch.tensor([ly.bias])])
    vis_b = torch.cat([(pin.sb != 0).any(1), torch.tensor([ly.bias])])
    vis_all = vis_a | vis_b
    out_a, out_b = (pout.sa != 0).any(1), (pout.sb != 0).any(1)
    full = torch.zeros(w_out, w_in + 1, dtype=torch.float64)
    for rows, vis in ((out_a & out_b, vis_all), (out_a & ~out_b, vis_a), (~out_a & out_b, vis_b)):
        if not rows.any():
            continue
        gv = g[vis][:, vis]
        lam = ridge * float(gv.diagonal().mean()) if ridge > 0 else 0.0
        rhs = c[rows][:, vis] + lam * full0[rows][:, vis]
        a = gv + lam * torch.eye(gv.shape[0], dtype=torch.float64)
        try:
            sol = torch.linalg.solve(a, rhs.T).T
        except RuntimeError:  # singular (ridge 0 and a feature that is always 0): least-norm solution
            log.warning("pleas: the Gram matrix of '%s' is singular; using its pseudo-inverse", ly.name)
            sol = rhs @ torch.linalg.pinv(a, hermitian=True)
        sub = full[rows]
        sub[:, vis] = sol
        full[rows] = sub
    resid = torch.einsum("ij,jk,ik->", full, g, full) - 2 * (full * c).sum() + y2
    err = float(resid.clamp_min(0) / y2.clamp_min(1e-300))
    return LayerFit(full[:, :w_in], full[:, w_in] if ly.bias else None, err)


def combine_param(p_a: Tensor, p_b: Tensor, axes: tuple[str | None, ...], plans: Mapping[str, AxisPlan],
                  name: str) -> Tensor:
    """S_A p_A + S_B p_B along the tensor's one permuted dimension (the average when it has none)."""
    dims = [d for d, ax in enumerate(axes) if ax is not None]
    if len(dims) > 1:
        raise ConfigError(f"pleas: '{name}' has more than one permuted dimension outside a linear layer")
    if not dims:
        return (p_a.double() + p_b.double()) / 2
    d, plan = dims[0], plans[axes[dims[0]]]  # type: ignore[index]
    a = torch.movedim(p_a.double(), d, 0)
    b = torch.movedim(p_b.double(), d, 0)
    out = torch.tensordot(plan.sa, a, dims=1) + torch.tensordot(plan.sb, b, dims=1)
    return torch.movedim(out, 0, d)


def merge_weights(spec: PLeaSSpec, state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor],
                  stats: FeatureStats | None, plans: Mapping[str, AxisPlan], *, ridge: float,
                  least_squares: bool = True) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Every tensor of the merged model (float64) and each layer's relative LS error.

    ``least_squares=False``: the permute-and-average weights W₀ (no statistics needed)."""
    out: dict[str, Tensor] = {}
    errors: dict[str, float] = {}
    for ly in spec.layers:
        wa, wb = state_a[f"{ly.name}.weight"], state_b[f"{ly.name}.weight"]
        ba = state_a.get(f"{ly.name}.bias") if ly.bias else None
        bb = state_b.get(f"{ly.name}.bias") if ly.bias else None
        pin, pout = plans[ly.in_axis], plans[ly.out_axis]
        if least_squares:
            assert stats is not None
            fit = solve_layer(ly, stats.moment(ly.site), wa, ba, wb, bb, pin, pout, ridge)
            w, b = fit.weight, fit.bias
            errors[ly.name] = fit.error
        else:
            w, b = permute_average(ly, wa, ba, wb, bb, pin, pout)
        out[f"{ly.name}.weight"] = w
        if b is not None:
            out[f"{ly.name}.bias"] = b
    for name, axes in spec.params.items():
        out[name] = combine_param(state_a[name], state_b[name], axes, plans, name)
    return out, errors
