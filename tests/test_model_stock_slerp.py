"""Model Stock and SLERP: exact small cases (float64 formulas), edge rules, mergekit parity."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_merge.errors import ConfigError
from lightning_merge.methods.base import TensorInputs
from lightning_merge.methods.model_stock import ModelStock
from lightning_merge.methods.registry import get_method
from lightning_merge.methods.slerp import DOT_THRESHOLD, Slerp, slerp


def _t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def _inputs(base, tensors, weights=None) -> TensorInputs:
    return TensorInputs("w", base, list(tensors), list(range(len(tensors))),
                        weights or [1.0] * len(tensors), seed=0)


# ------------------------------------------------------------------------------------- model stock

def _ref_stock(base: list[float], ws: list[list[float]]) -> list[float]:
    """Float64 Model Stock on flat lists."""
    k = len(ws)
    ds = [[a - b for a, b in zip(w, base, strict=True)] for w in ws]
    cos = []
    for a in range(k):
        for b in range(a + 1, k):
            dot = sum(x * y for x, y in zip(ds[a], ds[b], strict=True))
            na = math.sqrt(sum(x * x for x in ds[a]))
            nb = math.sqrt(sum(x * x for x in ds[b]))
            cos.append(max(-1.0, min(1.0, dot / max(na * nb, 1e-6))))
    c = sum(cos) / len(cos)
    den = 1 + (k - 1) * c
    t = 0.0 if abs(den) < 1e-6 else k * c / den
    mean = [sum(w[j] for w in ws) / k for j in range(len(base))]
    return [t * m + (1 - t) * b for m, b in zip(mean, base, strict=True)]


def test_model_stock_hand_case():
    base = [1.0, 2.0, 3.0, 4.0]
    w1 = [2.0, 2.0, 3.0, 4.0]          # δ1 = e1
    w2 = [2.0, 3.0, 3.0, 4.0]          # δ2 = e1 + e2 → cos = 1/√2
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    exp = [t * (a + b) / 2 + (1 - t) * z for a, b, z in zip(w1, w2, base, strict=True)]
    got = ModelStock().merge(_inputs(_t(base), [_t(w1), _t(w2)]))
    torch.testing.assert_close(got.double(), torch.tensor(exp, dtype=torch.float64), atol=1e-6, rtol=0)


def test_model_stock_special_angles():
    base = _t([1.0, -1.0, 0.5])
    e1, e2 = _t([1.0, 0.0, 0.0]), _t([0.0, 1.0, 0.0])
    torch.testing.assert_close(ModelStock().merge(_inputs(base, [base + e1, base + e2])), base)  # cos 0 → t 0
    torch.testing.assert_close(ModelStock().merge(_inputs(base, [base + e1, base + e1])), base + e1)  # t 1
    torch.testing.assert_close(ModelStock().merge(_inputs(base, [base + e1, base - e1])), base)  # singular


def test_model_stock_three_experts_and_filter_wise():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    ws = [base + 0.3 * torch.randn(4, 6, generator=g) for _ in range(3)]
    got = ModelStock().merge(_inputs(base, ws))
    exp = _ref_stock(base.reshape(-1).tolist(), [w.reshape(-1).tolist() for w in ws])
    torch.testing.assert_close(got.reshape(-1).double(), torch.tensor(exp, dtype=torch.float64),
                               atol=1e-5, rtol=1e-5)
    got_f = ModelStock(filter_wise=True).merge(_inputs(base, ws))
    rows = [_ref_stock(base[r].tolist(), [w[r].tolist() for w in ws]) for r in range(4)]
    torch.testing.assert_close(got_f.double(), torch.tensor(rows, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, got_f)
    # 1-D with filter_wise is one row; 3-D rows are (shape[0], -1)
    v0 = base[0]
    torch.testing.assert_close(ModelStock(filter_wise=True).merge(_inputs(v0, [w[0] for w in ws])),
                               ModelStock().merge(_inputs(v0, [w[0] for w in ws])))
    b3 = base.reshape(4, 2, 3)
    got3 = ModelStock(filter_wise=True).merge(_inputs(b3, [w.reshape(4, 2, 3) for w in ws]))
    torch.testing.assert_close(got3.reshape(4, 6), got_f)
    # filter_view="last_dim" (mergekit's): one t per vector along the last dimension, 8 vectors of 3
    got_last = ModelStock(filter_wise=True, filter_view="last_dim").merge(_inputs(b3, [w.reshape(4, 2, 3) for w in ws]))
    flat = base.reshape(8, 3)
    vecs = [_ref_stock(flat[r].tolist(), [w.reshape(8, 3)[r].tolist() for w in ws]) for r in range(8)]
    torch.testing.assert_close(got_last.reshape(8, 3).double(), torch.tensor(vecs, dtype=torch.float64),
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got_last.reshape(4, 6), got_f)
    # on 2-D tensors the two views agree
    torch.testing.assert_close(ModelStock(filter_wise=True, filter_view="last_dim").merge(_inputs(base, ws)), got_f)
    with pytest.raises(ConfigError, match="filter_view"):
        ModelStock(filter_view="cols")


def test_model_stock_edge_rules():
    base = _t([1.0, 2.0])
    ModelStock().check_experts(2)
    with pytest.raises(ConfigError, match="at least 2"):
        ModelStock().check_experts(1)
    torch.testing.assert_close(ModelStock().merge(_inputs(base, [base + 1])), base)  # one holder → base
    with pytest.raises(ConfigError, match="weights"):
        ModelStock().merge(_inputs(base, [base + 1, base - 1], [1.0, 2.0]))
    with pytest.raises(ConfigError, match="base"):
        ModelStock().merge(TensorInputs("w", None, [base, base], [0, 1], [1.0, 1.0]))
    with pytest.raises(ConfigError, match="filter_wise"):
        ModelStock(filter_wise="yes")
    assert isinstance(get_method("model_stock", filter_wise=True), ModelStock)
    assert ModelStock.space == "weight"


@pytest.mark.parity
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape, k", [((6, 9), 2), ((6, 9), 3), ((11,), 3)])
def test_model_stock_mergekit_parity(filter_wise, shape, k):
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    g = torch.Generator().manual_seed(k)
    base = torch.randn(*shape, generator=g)
    ws = [base + 0.1 * torch.randn(*shape, generator=g) + 0.05 for _ in range(k)]
    exp = registry.get("model_stock").merge_group(TensorGroup.from_tensors([base, *ws], base_index=0),
                                                  filter_wise=filter_wise)
    got = ModelStock(filter_wise=filter_wise).merge(_inputs(base, ws))
    torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- slerp

def test_slerp_endpoints():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    torch.testing.assert_close(Slerp(t=0.0).merge(_inputs(a, [b])), a)
    torch.testing.assert_close(Slerp(t=1.0).merge(_inputs(a, [b])), b)


@pytest.mark.parametrize("t", [0.25, 0.5, 0.9])
def test_slerp_hand_case(t):
    omega = 1.1
    v0 = [2.0, 0.0, 0.0]
    v1 = [3 * math.cos(omega), 3 * math.sin(omega), 0.0]  # norm 3, angle Ω
    ca, cb = math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    exp = [ca * x + cb * y for x, y in zip(v0, v1, strict=True)]
    got = Slerp(t=t).merge(_inputs(_t(v0), [_t(v1)]))
    torch.testing.assert_close(got.double(), torch.tensor(exp, dtype=torch.float64), atol=1e-6, rtol=0)
    # the unit-circle case: 45° between e1 and e2
    half = Slerp(t=0.5).merge(_inputs(_t([1.0, 0.0]), [_t([0.0, 1.0])]))
    torch.testing.assert_close(half, _t([math.sqrt(0.5), math.sqrt(0.5)]))


def test_slerp_colinear_falls_back_to_lerp():
    v0 = _t([1.0, 2.0, -1.0])
    for v1 in (3 * v0, -2 * v0, v0 + 1e-4):
        got = Slerp(t=0.3).merge(_inputs(v0, [v1]))
        torch.testing.assert_close(got, 0.7 * v0 + 0.3 * v1)
    # just below the threshold: real slerp, differs from lerp
    v1 = _t([1.0, 2.0, -0.8])
    dot = float(torch.nn.functional.cosine_similarity(v0, v1, dim=0))
    assert dot < DOT_THRESHOLD
    assert not torch.allclose(Slerp(t=0.3).merge(_inputs(v0, [v1])), 0.7 * v0 + 0.3 * v1, atol=1e-7)
    # a lower threshold forces the fallback
    torch.testing.assert_close(Slerp(t=0.3, dot_threshold=0.9).merge(_inputs(v0, [v1])), 0.7 * v0 + 0.3 * v1)


def test_slerp_zero_vector_is_finite():
    out = slerp(0.5, torch.zeros(4), _t([1.0, 2.0, 3.0, 4.0]))
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, math.sin(math.pi / 4) * _t([1.0, 2.0, 3.0, 4.0]))


def test_slerp_edge_rules():
    base = _t([1.0, 2.0])
    Slerp().check_experts(1)
    with pytest.raises(ConfigError, match="exactly one expert"):
        Slerp().check_experts(2)
    torch.testing.assert_close(Slerp(t=0.7).merge(_inputs(base, [])), base)  # expert lacks it
    with pytest.raises(ConfigError, match="exactly one expert"):
        Slerp().merge(_inputs(base, [base, base]))
    with pytest.raises(ConfigError, match="base"):
        Slerp().merge(TensorInputs("w", None, [base], [0], [1.0]))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="'t'"):
            Slerp(t=bad)
    with pytest.raises(ConfigError, match="dot_threshold"):
        Slerp(dot_threshold=1.5)
    assert isinstance(get_method("slerp", t=0.2), Slerp)
    assert Slerp.space == "weight"


@pytest.mark.parity
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_mergekit_parity(t):
    pytest.importorskip("mergekit")
    from mergekit.merge_methods.slerp import slerp as mk_slerp

    g = torch.Generator().manual_seed(2)
    a = torch.randn(16, 24, generator=g)
    for b in (torch.randn(16, 24, generator=g), 2 * a + 1e-5, a + 0.5 * torch.randn(16, 24, generator=g)):
        exp = mk_slerp(torch.tensor([t]), a.unsqueeze(0), b.unsqueeze(0))[0]
        torch.testing.assert_close(Slerp(t=t).merge(_inputs(a, [b])), exp, atol=1e-6, rtol=1e-5)
