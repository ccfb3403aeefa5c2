"""``ramplus_tl`` (RAM+, tensor-local): exact vectors, edge cases, YAML, parity with mergekit 0.1.5.

Parity is exact up to float32 rounding (λ_t computed in double here, in float32 there; the shared
mean's summation order): asserted with |ours − mergekit| ≤ 1e-6 · max(1, max |mergekit|), on the
kernel (random sparse tensors) and end to end on tiny random Llama models. One deliberate
difference is checked too: mergekit's NaN for an unchanged expert with ``epsilon: 0``.
"""

from __future__ import annotations

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
from lightning_merge.methods.ram import Ram
from lightning_merge.methods.ramplus_tl import RamPlusTL
from lightning_merge.sources import StateDictSource

METHOD = "ramplus_tl"
KEY = "model.layers.0.mlp.up_proj.weight"


def merge(base, experts, weights=None, method=None, **params):
    b = StateDictSource({KEY: base}, "base")
    es = [StateDictSource({KEY: e}, f"e{i}") for i, e in enumerate(experts)]
    return dict(run_plan(build_plan(b, es, method or RamPlusTL(**params), weights=weights)))[KEY]


def reference(base, experts, r, alpha, eps):
    """Counts per expert, then entry by entry (plain Python floats)."""
    flat = [(e - base).reshape(-1).tolist() for e in experts]
    n = len(flat[0])
    changed = [[abs(d[j]) > eps for j in range(n)] for d in flat]
    count = [sum(c[j] for c in changed) for j in range(n)]
    lam = []
    for c in changed:
        shared = sum(1 for j in range(n) if c[j] and count[j] > 1)
        unique = sum(1 for j in range(n) if c[j] and count[j] == 1)
        lam.append(1.0 + r * min(max(shared / max(unique, eps), 0.0), alpha) if unique else 1.0)
    out = []
    for j in range(n):
        vals = [(t, flat[t][j]) for t in range(len(flat)) if changed[t][j]]
        if not vals:
            out.append(0.0)
        elif len(vals) == 1:
            out.append(lam[vals[0][0]] * vals[0][1])
        else:
            out.append(sum(v for _, v in vals) / len(vals))
    return base + torch.tensor(out, dtype=torch.float32).reshape(base.shape)


# ------------------------------------------------------------------------------------------ exact values

@pytest.mark.parametrize("r,alpha,want", [
    (0.1, 0.2, [1.0, 1.02, 1.02, 2.04]),   # ρ = (0.5, 1) both clamped to 0.2
    (0.5, 10.0, [1.0, 1.25, 1.25, 3.0]),   # unclamped: λ = (1.25, 1.5)
    (0.0, 0.2, [1.0, 1.0, 1.0, 2.0]),      # r = 0: RAM
])
def test_hand_vector(r, alpha, want):
    base = torch.zeros(4)
    # c = [2, 1, 1, 1]; expert 1: S = 1, U = 2 (ρ = 0.5); expert 2: S = 1, U = 1 (ρ = 1)
    e1 = torch.tensor([1.0, 1.0, 1.0, 0.0])
    e2 = torch.tensor([1.0, 0.0, 0.0, 2.0])
    torch.testing.assert_close(merge(base, [e1, e2], r=r, alpha=alpha), torch.tensor(want))


def test_matches_a_reference():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 6, generator=g)
    experts = [base + torch.randn(5, 6, generator=g) * (i + 1) * 0.1 for i in range(3)]
    for r, alpha, eps in [(0.1, 0.2, 1e-5), (0.7, 3.0, 0.1), (2.0, 0.5, 0.2), (0.3, 1.0, 2.0)]:
        torch.testing.assert_close(merge(base, experts, r=r, alpha=alpha, epsilon=eps),
                                   reference(base, experts, r, alpha, eps))


def test_r_zero_is_ram():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(8, 8, generator=g)
    experts = [base + torch.randn(8, 8, generator=g) * 0.1 for _ in range(3)]
    torch.testing.assert_close(merge(base, experts, r=0.0, epsilon=0.1),
                               merge(base, experts, method=Ram(epsilon=0.1)), rtol=0, atol=0)


def test_scale_is_tensor_local():
    """The same entry gets another factor when the rest of the tensor overlaps differently."""
    base = torch.zeros(4)
    a = merge(base, [torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0, 0.0])], r=1.0, alpha=5.0)
    b = merge(base, [torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 1.0, 0.0])], r=1.0, alpha=5.0)
    assert float(a[0]) == pytest.approx(2.0) and float(b[0]) == pytest.approx(3.0)  # ρ = 1 vs 2
    assert RamPlusTL.elementwise is False


# ------------------------------------------------------------------------------------------ edge cases

def test_zero_deltas_give_the_base():
    base = torch.randn(4, 5)
    assert torch.equal(merge(base, [base.clone(), base.clone()], r=1.0, alpha=1.0), base)


def test_one_expert_is_that_expert():
    base = torch.randn(3, 4)
    e = base + torch.randn(3, 4)
    torch.testing.assert_close(merge(base, [e], epsilon=0.0, r=5.0, alpha=5.0), e, rtol=0, atol=1e-6)


def test_unchanged_expert_with_epsilon_zero_stays_finite():
    base = torch.zeros(3)
    e = torch.tensor([0.5, 0.0, 0.25])
    out = merge(base, [e, base.clone()], epsilon=0.0, r=1.0, alpha=1.0)
    torch.testing.assert_close(out, e)


def test_empty_tensor():
    base = torch.zeros(0, 3)
    out = RamPlusTL().merge(TensorInputs("w", base, [torch.zeros(0, 3), torch.zeros(0, 3)], [0, 1], [1.0, 1.0]))
    assert out.shape == (0, 3)


def test_engine_keeps_bfloat16():
    base = torch.zeros(4, 4, dtype=torch.bfloat16)
    e = torch.full((4, 4), 0.5, dtype=torch.bfloat16)
    out = merge(base, [e], r=1.0)
    assert out.dtype == torch.bfloat16 and torch.equal(out, e)


# ------------------------------------------------------------------------------------------ validation

@pytest.mark.parametrize("param,value", [("r", -0.1), ("r", float("nan")), ("alpha", -1.0), ("alpha", "x"),
                                         ("epsilon", -1e-5), ("epsilon", float("inf"))])
def test_bad_values_name_the_parameter(param, value):
    with pytest.raises(ConfigError, match=f"ramplus_tl: parameter '{param}'"):
        RamPlusTL(**{param: value})


def test_weights_are_refused():
    base = torch.zeros(3)
    with pytest.raises(ConfigError, match="ramplus_tl: per-expert weights"):
        merge(base, [base + 1, base + 2], weights=[2.0, 1.0])


def test_get_method_by_name():
    assert get_method("ramplus_tl", r=0.3) == RamPlusTL(r=0.3, alpha=0.2, epsilon=1e-5)


# ------------------------------------------------------------------------------------------ YAML

def _cfg(**params):
    out = {"merge_method": "ramplus_tl", "base_model": "base", "models": [{"model": "e0"}, {"model": "e1"}]}
    if params:
        out["parameters"] = params
    return out


def test_yaml_defaults_and_parameters():
    assert parse_config(_cfg()).method == RamPlusTL(r=0.1, alpha=0.2, epsilon=1e-5)
    assert parse_config(_cfg(r=0.5, alpha=1, epsilon=0.01)).method == RamPlusTL(r=0.5, alpha=1.0, epsilon=0.01)
    r = parse_config(_cfg(r=[0.0, 1.0]))
    assert r.tensor_params is not None


def test_yaml_ignored_parameters_and_refusals(caplog):
    c = _cfg()
    c["models"][1]["parameters"] = {"r": 0.5}
    assert_ignored(c, _cfg(), caplog, "models[1].parameters.r (a global parameter of 'ramplus_tl'")
    c["models"][1]["parameters"] = {"weight": 1.0}
    assert_ignored(c, _cfg(), caplog, "models[1].parameters.weight")
    with pytest.raises(ConfigError, match="unknown parameter for 'ramplus_tl'.*did you mean 'alpha'"):
        parse_config(_cfg(alpah=0.3))
    with pytest.raises(ConfigError, match=r"parameter 'alpha'.*\[set by: parameters\.alpha"):
        parse_config(_cfg(alpha=-0.2))


# ------------------------------------------------------------------------------------------ parity


def _mergekit_kernel(base, deltas, **params):
    from mergekit.merge_methods.base import TensorEntry, TensorGroup
    from mergekit.merge_methods.ram import ramplus_tl_merge

    entries = [TensorEntry("base", base.clone(), is_base=True)]
    entries += [TensorEntry(f"e{i}", base + d) for i, d in enumerate(deltas)]
    return ramplus_tl_merge.implementation(TensorGroup(entries=entries), **params)


@pytest.mark.parity
@pytest.mark.parametrize("r,alpha,eps", [(0.1, 0.2, 1e-5), (0.5, 10.0, 0.1), (2.0, 0.5, 0.3), (1.0, 3.0, 0.0)])
def test_kernel_parity_with_mergekit(r, alpha, eps):
    parity_module()
    g = torch.Generator().manual_seed(1)
    for shape, n in [((5, 8), 1), ((16, 9), 2), ((33,), 3), ((0, 4), 2), ((4, 4), 4)]:
        base = torch.randn(shape, generator=g)
        deltas = [torch.randn(shape, generator=g) * 0.3 * (torch.rand(shape, generator=g) < 0.35 + 0.1 * i)
                  for i in range(n)]
        if eps > 0:
            deltas.append(torch.zeros(shape))  # an unchanged expert (with ε = 0: see the next test)
        ref = _mergekit_kernel(base, deltas, r=r, alpha=alpha, epsilon=eps)
        ours = merge(base, [base + d for d in deltas], r=r, alpha=alpha, epsilon=eps)
        assert_close_scaled(ours, ref, f"{shape} x{n} r={r} alpha={alpha} eps={eps}")


@pytest.mark.parity
def test_mergekit_nan_for_an_unchanged_expert_with_epsilon_zero():
    """mergekit: ρ = 0/0 for an expert that changed nothing, and 0·NaN spreads to the whole tensor.
    Ours: that expert adds nothing, as it does for any ε > 0 in mergekit too."""
    parity_module()
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 6, generator=g)
    deltas = [torch.randn(6, 6, generator=g) * (torch.rand(6, 6, generator=g) < 0.5) for _ in range(2)]
    params = {"r": 0.5, "alpha": 2.0, "epsilon": 0.0}
    assert bool(torch.isnan(_mergekit_kernel(base, deltas + [torch.zeros(6, 6)], **params)).all())
    ours = merge(base, [base + d for d in deltas] + [base.clone()], **params)
    assert_close_scaled(ours, _mergekit_kernel(base, deltas, **params), "unchanged expert left out")


CONFIGS = {
    "defaults": {"models": [{"model": "e0"}, {"model": "e1"}]},
    "all_parameters_base_listed": {
        "models": [{"model": "base"}, {"model": "e0"}, {"model": "e1"}, {"model": "e2"}],
        "parameters": {"r": 0.5, "alpha": 10.0, "epsilon": 0.015}},
    "gradients_and_filters": {
        "models": [{"model": "e0"}, {"model": "e2"}],
        "parameters": {"r": [0.0, 1.5], "alpha": [{"filter": "self_attn", "value": 0.1}, {"value": 4.0}],
                       "epsilon": [{"filter": "mlp", "value": [0.01, 0.03]}, {"value": 0.02}]}},
}


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_end_to_end_parity_with_mergekit(name, llamas, tmp_path):
    p = parity_module()
    config = p._resolve({"merge_method": METHOD, "base_model": "base", **CONFIGS[name]}, llamas)
    ours, ref = run_both(config, tmp_path)
    assert_parity(ours, ref, name)
