"""Model Breadcrumbs: exact small cases against a float64 reference, edge rules, mergekit parity."""

from __future__ import annotations

import pytest
import torch

from lightning_merge.errors import ConfigError
from lightning_merge.methods.base import TensorInputs
from lightning_merge.methods.breadcrumbs import (
    Breadcrumbs,
    BreadcrumbsTies,
    breadcrumbs_mask,
    breadcrumbs_prune,
)
from lightning_merge.methods.registry import get_method


def _t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def _ref_prune(x: list[float], d: float, g: float) -> list[float]:
    """Straightforward float64 reference: drop ⌊g·n⌋ top outliers, keep the next ⌊d·n⌋."""
    n = len(x)
    if d >= 1:
        return list(x)
    k = int(d * n)
    skip = min(int(g * n), n - k)
    order = sorted(range(n), key=lambda i: (-abs(x[i]), i))
    keep = set(order[skip:skip + k])
    return [x[i] if i in keep else 0.0 for i in range(n)]


def _ref_merge(base, taus, w, d, g, lam, ties, normalize):
    pr = [_ref_prune(t, d, g) for t in taus]
    out = []
    for j in range(len(base)):
        vals = [w[t] * pr[t][j] for t in range(len(taus))]
        if ties:
            s = sum(vals)
            sign = 1.0 if s >= 0 else -1.0
            sel = [t for t in range(len(taus)) if vals[t] != 0 and (vals[t] > 0) == (sign > 0)]
            num = sum(vals[t] for t in sel)
            den = sum(w[t] for t in sel) or 1.0
        else:
            num = sum(vals)
            den = sum(w) if abs(sum(w)) >= 1e-8 else 1.0
        out.append(base[j] + lam * (num / den if normalize else num))
    return out


def test_mask_hand_case(tau_inputs):
    _, taus = tau_inputs
    # τ1 = [0.5, -0.25, 0, 0.875, -0.125, 0.375]; |τ| order: 3, 0, 5, 1, 4, 2
    # density 0.5 → k = 3, gamma 0.2 → 1 outlier (index 3) removed → keep 0, 5, 1
    m = breadcrumbs_mask(taus[0], 0.5, 0.2)
    assert m.tolist() == [True, True, False, False, False, True]
    torch.testing.assert_close(breadcrumbs_prune(taus[0], 0.5, 0.2), _t([0.5, -0.25, 0, 0, 0, 0.375]))


@pytest.mark.parametrize("d, g", [(0.5, 0.2), (0.34, 0.0), (0.9, 0.3), (0.67, 0.17), (0.2, 0.5)])
def test_prune_matches_reference(d, g):
    x = torch.randn(40, generator=torch.Generator().manual_seed(1))
    x[5] = x[6]  # a tie: the lower index counts as larger
    out = breadcrumbs_prune(x, d, g)
    torch.testing.assert_close(out.double(), torch.tensor(_ref_prune(x.double().tolist(), d, g),
                                                          dtype=torch.float64))
    assert int(breadcrumbs_mask(x, d, g).sum()) == int(d * 40)


def test_outlier_removal_shrinks_to_keep_density():
    x = _t([float(i) for i in range(1, 11)])  # |x| ascending
    # k = 9, 2 outliers requested, only 1 can go
    assert breadcrumbs_mask(x, 0.9, 0.2).tolist() == [True] * 9 + [False]
    assert breadcrumbs_mask(x, 0.5, 0.2).tolist() == [False] * 3 + [True] * 5 + [False] * 2


def test_density_one_is_identity(tau_inputs):
    base, taus = tau_inputs
    assert breadcrumbs_prune(taus[0], 1.0, 0.5) is taus[0]
    inputs = TensorInputs("w", base, list(taus), [0, 1, 2], [1.0, 1.0, 1.0])
    torch.testing.assert_close(Breadcrumbs(gamma=0.3).merge(inputs), base + sum(taus))


def test_norm_rescale(tau_inputs):
    _, taus = tau_inputs
    out = breadcrumbs_prune(taus[1], 0.5, 0.2, "l1")
    assert float(out.abs().sum()) == pytest.approx(float(taus[1].abs().sum()), rel=1e-6)
    kept = breadcrumbs_prune(taus[1], 0.5, 0.2)
    torch.testing.assert_close(out, kept * (taus[1].abs().sum() / kept.abs().sum()))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_merge_matches_reference(tau_inputs, ties, normalize):
    base, taus = tau_inputs
    w = [1.0, 2.0, 0.5]
    cls = BreadcrumbsTies if ties else Breadcrumbs
    method = cls(density=0.5, gamma=0.2, lambda_=0.8, normalize=normalize)
    got = method.merge(TensorInputs("w", base, list(taus), [0, 1, 2], w))
    exp = _ref_merge(base.tolist(), [t.tolist() for t in taus], w, 0.5, 0.2, 0.8, ties, normalize)
    torch.testing.assert_close(got.double(), torch.tensor(exp, dtype=torch.float64), atol=1e-6, rtol=1e-6)


def test_per_expert_values(tau_inputs):
    base, taus = tau_inputs
    m = Breadcrumbs(density=[1.0, 0.5], gamma=[0.0, 0.2])
    got = m.merge(TensorInputs("w", base, [taus[0], taus[1]], [0, 1], [1.0, 1.0]))
    torch.testing.assert_close(got, base + taus[0] + _t(_ref_prune(taus[1].tolist(), 0.5, 0.2)))
    with pytest.raises(ConfigError, match="gamma"):
        Breadcrumbs(density=0.5, gamma=[0.1, 0.2, 0.3]).check_experts(2)


def test_defaults_and_registry():
    b = get_method("breadcrumbs")
    assert isinstance(b, Breadcrumbs)
    assert (b.density, b.gamma, b.normalize, b.rescale) == (1.0, 0.01, False, "none")
    bt = get_method("breadcrumbs_ties", density=0.9, **{"lambda": 0.5})
    assert isinstance(bt, BreadcrumbsTies) and bt.lambda_ == 0.5 and bt.normalize is False


@pytest.mark.parametrize("params, name", [
    ({"density": 0.0}, "density"),
    ({"density": 1.2}, "density"),
    ({"gamma": 1.0}, "gamma"),
    ({"gamma": -0.1}, "gamma"),
    ({"rescale": "inverse_prob"}, "rescale"),
    ({"lambda_": float("inf")}, "lambda_"),
])
def test_bad_hyperparameters(params, name):
    for cls in (Breadcrumbs, BreadcrumbsTies):
        with pytest.raises(ConfigError, match=name):
            cls(**params)
    with pytest.raises(ConfigError, match="zero_sign"):
        BreadcrumbsTies(zero_sign="none")


# ----------------------------------------------------------------------------------- mergekit parity

@pytest.mark.parity
@pytest.mark.parametrize("d, g", [(0.5, 0.01), (0.3, 0.1), (0.9, 0.2), (0.05, 0.0)])
@pytest.mark.parametrize("rescale", [False, True])
def test_mergekit_kernel_parity(d, g, rescale):
    pytest.importorskip("mergekit")
    from mergekit.sparsify import RescaleNorm, magnitude_outliers

    x = torch.randn(12, 37, generator=torch.Generator().manual_seed(4))
    exp = magnitude_outliers(x, d, RescaleNorm.l1 if rescale else None, gamma=g)
    torch.testing.assert_close(breadcrumbs_prune(x, d, g, "l1" if rescale else "none"), exp)


@pytest.mark.parity
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_mergekit_merge_parity(ties, normalize):
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    g = torch.Generator().manual_seed(9)
    base = torch.randn(8, 20, generator=g)
    deltas = [torch.randn(8, 20, generator=g) for _ in range(3)]
    w, dens, gam = [1.0, 0.6, 1.4], [0.5, 0.7, 0.3], [0.02, 0.1, 0.0]
    group = TensorGroup.from_tensors([base] + [base + dl for dl in deltas], base_index=0)
    params = {"int8_mask": False, "normalize": normalize, "rescale": True, "lambda": 0.9,
              "weight": {i + 1: w[i] for i in range(3)}, "density": {i + 1: dens[i] for i in range(3)},
              "gamma": {i + 1: gam[i] for i in range(3)}}
    exp = registry.get("breadcrumbs_ties" if ties else "breadcrumbs").merge_group(group, **params)
    cls = BreadcrumbsTies if ties else Breadcrumbs
    ours = cls(density=dens, gamma=gam, rescale="l1", normalize=normalize, lambda_=0.9)
    got = ours.merge(TensorInputs("w", base, deltas, [0, 1, 2], w))
    torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)
