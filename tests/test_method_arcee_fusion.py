"""``arcee_fusion``: exact vectors, edge cases, YAML, parity with mergekit 0.1.5.

The independent reference computes the importance row by row with ``math`` and the quantiles
from a sorted Python list. Parity with mergekit is asserted as |ours − mergekit| ≤ 1e-6 · max(1,
max |mergekit|) (in practice bit-identical) on the kernel and end to end (``lightning-merge
merge`` vs ``run_merge`` on tiny random Llama models, base_model listed or not; the method has
no YAML parameters).

Tensors of more than 1,000,000 entries: both tools estimate the quantiles from 1,000,000 entries
drawn with replacement, from different generators, so the threshold τ is compared in
distribution. On Exp(1) importances (Q1, Q2, Q3 = ln 4/3, ln 2, ln 4) the sample quantiles have
standard deviations √(p(1 − p)/m) / f(Q_p) ≈ 5.8e-4, 1.0e-3, 1.7e-3 for m = 10⁶, so τ = Q2 +
1.5 (Q3 − Q1) has σ_τ ≤ 1.0e-3 + 1.5 (1.7e-3 + 5.8e-4) ≈ 4.5e-3: each tool's τ must lie within
5 σ_τ of the exact τ, and the two within 5·√2 σ_τ of each other.
"""

from __future__ import annotations

import math

import pytest
import torch
from mergekit_helpers import (
    assert_close_scaled,
    assert_ignored,
    assert_parity,
    parity_module,
    run_both,
)

from lightning_merge.engine import build_plan, run_plan
from lightning_merge.errors import ConfigError
from lightning_merge.mergekit import parse_config
from lightning_merge.methods import TensorInputs, get_method
from lightning_merge.methods.arcee_fusion import ArceeFusion, fusion_importance, fusion_threshold
from lightning_merge.sources import StateDictSource

KEY = "model.layers.0.mlp.up_proj.weight"


def merge(base, experts, weights=None, seed=0, **params):
    b = StateDictSource({KEY: base}, "base")
    es = [StateDictSource({KEY: e}, f"e{i}") for i, e in enumerate(experts)]
    return dict(run_plan(build_plan(b, es, ArceeFusion(**params), weights=weights, seed=seed)))[KEY]


def _softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    return [x / sum(e) for x in e]


def reference(a, b):
    """Importance per row with math, quantiles from a sorted list, then the masked fusion."""
    rows_a = a.double().reshape(-1, a.shape[-1]).tolist()
    rows_b = b.double().reshape(-1, b.shape[-1]).tolist()
    imp = []
    for ra, rb in zip(rows_a, rows_b):
        p = [x + 1e-8 for x in _softmax(rb)]
        q = [x + 1e-8 for x in _softmax(ra)]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        imp.extend(abs(y - x) * kl for x, y in zip(ra, rb))
    s = sorted(imp)
    q1, q2, q3 = (s[int(f * (len(s) - 1))] for f in (0.25, 0.5, 0.75))
    tau = q2 + 1.5 * (q3 - q1)
    flat_a, flat_b = a.flatten().tolist(), b.flatten().tolist()
    out = [y if i >= tau else x for x, y, i in zip(flat_a, flat_b, imp)]
    return torch.tensor(out).reshape(a.shape), imp, tau


def _pair(shape=(6, 7), seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, base + torch.randn(shape, generator=g) * scale


# ------------------------------------------------------------------------------------------ exact values

def test_hand_vector():
    a = torch.zeros(1, 4)
    b = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    p = [math.e**2 / (math.e**2 + 3)] + [1 / (math.e**2 + 3)] * 3
    kl = sum((pi + 1e-8) * math.log((pi + 1e-8) / (0.25 + 1e-8)) for pi in p)
    imp = fusion_importance(b, a)
    torch.testing.assert_close(imp, torch.tensor([[2 * kl, 0.0, 0.0, 0.0]]), rtol=1e-5, atol=0)
    # importances (0, 0, 0, 2 kl): Q1 = Q2 = 0 (positions 0, 1), Q3 = 0 (position 2): τ = 0, all kept
    torch.testing.assert_close(merge(a, [b]), b)


def test_threshold_uses_order_statistics_without_interpolation():
    imp = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 100.0, 6.0, 7.0, 0.0])  # sorted: 0 1 2 3 4 5 6 7 100
    # m = 9: positions 2, 4, 6 -> Q1 = 2, Q2 = 4, Q3 = 6; τ = 4 + 1.5 · 4 = 10
    assert float(fusion_threshold(imp)) == 10.0
    imp = torch.arange(10.0)  # m = 10: positions floor(2.25, 4.5, 6.75) = 2, 4, 6
    assert float(fusion_threshold(imp)) == 10.0


@pytest.mark.parametrize("shape,scale", [((6, 7), 0.1), ((12, 5), 1.0), ((40,), 0.5), ((3, 4, 5), 0.3)])
def test_matches_an_independent_reference(shape, scale):
    a, b = _pair(shape, seed=shape[0], scale=scale)
    want, imp, tau = reference(a, b)
    got_imp = fusion_importance(b, a).flatten()
    torch.testing.assert_close(got_imp, torch.tensor(imp, dtype=torch.float32), rtol=1e-4, atol=1e-9)
    assert abs(float(fusion_threshold(got_imp)) - tau) <= 1e-4 * max(abs(tau), 1e-6)
    margin = (torch.tensor(imp) - tau).abs().min()
    assert margin > 1e-6  # no entry sits on the threshold, so the masks must agree exactly
    torch.testing.assert_close(merge(a, [b]), want, rtol=0, atol=1e-6)  # a + (b − a) rounds


# ------------------------------------------------------------------------------------------ edge cases

def test_zero_deltas_give_the_base():
    a, _ = _pair()
    assert torch.equal(merge(a, [a.clone()]), a)


def test_a_constant_row_shift_has_no_importance():
    a, b = _pair((4, 6))
    b[1] = a[1] + 0.7  # softmax is shift-invariant: KL = 0 in row 1
    assert float(fusion_importance(b, a)[1].abs().max()) < 1e-6


def test_only_outliers_change():
    a, b = _pair((16, 16), seed=3)
    out = merge(a, [b])
    changed = out != a
    assert 0 < float(changed.float().mean()) < 0.5
    torch.testing.assert_close(out[changed], b[changed], rtol=0, atol=1e-6)
    assert torch.equal(out[~changed], a[~changed])


def test_single_entry_and_empty_tensors():
    a, b = torch.tensor([1.0]), torch.tensor([3.0])
    assert torch.equal(merge(a, [b]), b)  # m = 1: τ = I, kept (KL of a 1-entry softmax is 0)
    e = torch.zeros(0, 3)
    assert merge(e, [e.clone()]).shape == (0, 3)
    x = torch.randn(3)
    assert torch.equal(ArceeFusion().merge(TensorInputs(KEY, x, [], [], [])), x)


def test_engine_keeps_bfloat16():
    a, b = (x.to(torch.bfloat16) for x in _pair((4, 4)))
    out = dict(run_plan(build_plan(StateDictSource({KEY: a}, "b"), [StateDictSource({KEY: b}, "e")],
                                   ArceeFusion())))[KEY]
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("q", [0, -5, 1.5, True, "1000"])
def test_bad_quantile_sample_names_the_parameter(q):
    with pytest.raises(ConfigError, match="arcee_fusion: parameter 'quantile_sample'"):
        ArceeFusion(quantile_sample=q)


def test_expert_count_weights_and_base():
    a, b = _pair()
    with pytest.raises(ConfigError, match="exactly one expert"):
        merge(a, [b, b.clone()])
    with pytest.raises(ConfigError, match="weights"):
        merge(a, [b], weights=[2.0])
    with pytest.raises(ConfigError, match="base"):
        ArceeFusion().merge(TensorInputs(KEY, None, [b], [0], [1.0]))


def test_get_method_by_name():
    assert get_method("arcee_fusion") == ArceeFusion(quantile_sample=1_000_000)
    assert get_method("arcee_fusion", quantile_sample=None).quantile_sample is None


# ------------------------------------------------------------------------------------------ sampling

N_BIG = 1_200_000
SIGMA_TAU = 4.5e-3
EXACT_TAU = math.log(2) + 1.5 * (math.log(4) - math.log(4 / 3))


@pytest.fixture(scope="module")
def exp_importance():
    g = torch.Generator().manual_seed(7)
    return -torch.log(torch.rand(N_BIG, generator=g))  # Exp(1)


def test_sampled_threshold_is_seeded_and_near_exact(exp_importance):
    exact = float(fusion_threshold(exp_importance, None))
    assert abs(exact - EXACT_TAU) < 5 * SIGMA_TAU
    taus = []
    for seed in (0, 1):
        gen = torch.Generator().manual_seed(seed)
        taus.append(float(fusion_threshold(exp_importance, 1_000_000, gen)))
        assert abs(taus[-1] - exact) <= 5 * SIGMA_TAU
    assert taus[0] != taus[1] and taus[0] != exact
    again = float(fusion_threshold(exp_importance, 1_000_000, torch.Generator().manual_seed(0)))
    assert again == taus[0]


def test_large_tensor_is_seeded_through_the_engine():
    a, b = _pair((1001, 1000), seed=5, scale=0.05)  # > 10⁶ entries
    x, y = merge(a, [b], seed=0), merge(a, [b], seed=0)
    z = merge(a, [b], seed=1)
    exact = merge(a, [b], quantile_sample=None)
    assert torch.equal(x, y) and not torch.equal(x, z)
    for out in (x, z):  # kept fractions near the exact one
        assert abs(float((out != a).float().mean()) - float((exact != a).float().mean())) < 5e-3


# ------------------------------------------------------------------------------------------ YAML

def test_yaml(caplog):
    cfg = {"merge_method": "arcee_fusion", "base_model": "base", "models": [{"model": "base"}, {"model": "e0"}]}
    r = parse_config(cfg)
    assert r.method == ArceeFusion(quantile_sample=1_000_000) and r.experts == ["e0"]
    with pytest.raises(ConfigError, match="exactly 1 model"):
        parse_config({**cfg, "models": [{"model": "e0"}, {"model": "e1"}]})
    # parameters mergekit accepts and arcee_fusion ignores: one warning, no effect
    assert_ignored({**cfg, "parameters": {"t": 0.5}}, cfg, caplog, "parameters.t")
    assert_ignored({**cfg, "models": [{"model": "base"}, {"model": "e0", "parameters": {"weight": 0.5}}]}, cfg,
                   caplog, "models[1].parameters.weight")
    with pytest.raises(ConfigError, match="unknown parameter for 'arcee_fusion'"):
        parse_config({**cfg, "parameters": {"bogus": 0.5}})
    with pytest.raises(ConfigError, match="base_model"):
        parse_config({"merge_method": "arcee_fusion", "models": [{"model": "e0"}]})


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parity
def test_kernel_parity_with_mergekit():
    parity_module()
    from mergekit.merge_methods.arcee_fusion import arcee_fusion_merge_method
    from mergekit.merge_methods.base import TensorEntry, TensorGroup

    for shape, scale in [((5, 8), 0.1), ((33,), 1.0), ((16, 16), 0.01), ((4, 4), 0.0), ((2, 3, 7), 0.5)]:
        a, b = _pair(shape, seed=shape[0], scale=scale)
        group = TensorGroup(entries=[TensorEntry("base", a.clone(), is_base=True), TensorEntry("e", b.clone())])
        assert_close_scaled(merge(a, [b]), arcee_fusion_merge_method.implementation(group), f"{shape}")


@pytest.mark.parity
def test_sampled_threshold_matches_mergekit_in_distribution(exp_importance):
    parity_module()
    from mergekit.merge_methods.arcee_fusion import DynamicThresholdFusion

    torch.manual_seed(0)
    ref = float(DynamicThresholdFusion().calculate_dynamic_threshold(exp_importance))
    ours = float(fusion_threshold(exp_importance, 1_000_000, torch.Generator().manual_seed(3)))
    exact = float(fusion_threshold(exp_importance, None))
    assert abs(ref - exact) <= 5 * SIGMA_TAU and ref != exact  # mergekit samples too
    assert abs(ours - ref) <= 5 * 2**0.5 * SIGMA_TAU


CONFIGS = {
    "defaults": {"models": [{"model": "e1"}]},
    "base_listed": {"models": [{"model": "base"}, {"model": "e2"}]},
}


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_end_to_end_parity_with_mergekit(name, llamas, tmp_path):
    p = parity_module()
    config = p._resolve({"merge_method": "arcee_fusion", "base_model": "base", **CONFIGS[name]}, llamas)
    ours, ref = run_both(config, tmp_path)
    changed = assert_parity(ours, ref, name, base=p._load(llamas / "base"))
    assert changed
