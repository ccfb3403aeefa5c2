"""``ram`` (Reinforced Agent Merging): exact vectors, edge cases, YAML, parity with mergekit 0.1.5.

Parity is exact up to float32 rounding (mergekit sums δ_t / c, we divide the sum by c): asserted
with |ours − mergekit| ≤ 1e-6 · max(1, max |mergekit|), on the kernel (random sparse tensors,
including zero and empty ones) and end to end (``lightning-merge merge`` vs ``run_merge`` on tiny
random Llama models).
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
from lightning_merge.sources import StateDictSource

KEY = "model.layers.0.mlp.up_proj.weight"


def merge(base, experts, weights=None, **params):
    """Through the engine: experts are full weights θ_t."""
    b = StateDictSource({KEY: base}, "base")
    es = [StateDictSource({KEY: e}, f"e{i}") for i, e in enumerate(experts)]
    return dict(run_plan(build_plan(b, es, Ram(**params), weights=weights)))[KEY]


def reference(base, experts, eps):
    """Entry by entry: the mean of the deltas larger than eps in magnitude (0 when none)."""
    out = base.clone().reshape(-1)
    deltas = [(e - base).reshape(-1) for e in experts]
    for j in range(out.numel()):
        changed = [float(d[j]) for d in deltas if abs(float(d[j])) > eps]
        out[j] += sum(changed) / len(changed) if changed else 0.0
    return out.reshape(base.shape)


# ------------------------------------------------------------------------------------------ exact values

def test_hand_vector():
    base = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    d1 = torch.tensor([0.5, 0.0, 0.25, 1e-6, -0.25])
    d2 = torch.tensor([0.25, 0.5, 0.0, 0.0, 0.25])
    # c = [2, 1, 1, 0, 2]: shared entries averaged, unique ones kept whole, 1e-6 ≤ ε dropped
    want = base + torch.tensor([0.375, 0.5, 0.25, 0.0, 0.0])
    torch.testing.assert_close(merge(base, [base + d1, base + d2]), want, rtol=0, atol=1e-7)


def test_matches_an_entrywise_reference():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 7, generator=g)
    experts = [base + torch.randn(6, 7, generator=g) * (i + 1) * 0.1 for i in range(3)]
    for eps in (0.0, 0.05, 0.15, 10.0):
        torch.testing.assert_close(merge(base, experts, epsilon=eps), reference(base, experts, eps))


def test_threshold_is_strict():
    base = torch.zeros(3)
    e = torch.tensor([0.5, 0.25, 0.125])
    torch.testing.assert_close(merge(base, [e], epsilon=0.25), torch.tensor([0.5, 0.0, 0.0]))


# ------------------------------------------------------------------------------------------ edge cases

def test_zero_deltas_give_the_base():
    base = torch.randn(4, 5)
    assert torch.equal(merge(base, [base.clone(), base.clone()]), base)


def test_identical_experts_give_that_expert():
    base = torch.randn(4, 5)
    e = base + torch.randn(4, 5) * 0.1
    torch.testing.assert_close(merge(base, [e, e.clone(), e.clone()], epsilon=0.0), e, rtol=0, atol=1e-6)


def test_one_expert_with_epsilon_zero_is_that_expert():
    base = torch.randn(3, 4)
    e = base + torch.randn(3, 4)
    torch.testing.assert_close(merge(base, [e], epsilon=0.0), e, rtol=0, atol=1e-6)


def test_opposite_deltas_cancel_where_shared():
    base = torch.zeros(2)
    out = merge(base, [torch.tensor([0.5, 0.5]), torch.tensor([-0.5, 0.0])])
    torch.testing.assert_close(out, torch.tensor([0.0, 0.5]))


def test_empty_tensor():
    base = torch.zeros(0, 3)
    out = Ram().merge(TensorInputs("w", base, [torch.zeros(0, 3), torch.zeros(0, 3)], [0, 1], [1.0, 1.0]))
    assert out.shape == (0, 3)


def test_no_expert_has_the_tensor_gives_the_base():
    base = torch.randn(3)
    out = Ram().merge(TensorInputs("w", base, [], [], []))
    assert torch.equal(out, base) and out is not base


def test_engine_keeps_bfloat16():
    base = torch.randn(4, 4).to(torch.bfloat16)
    e = (base.float() + 0.5).to(torch.bfloat16)
    out = merge(base, [e, e])
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, e)


# ------------------------------------------------------------------------------------------ validation

@pytest.mark.parametrize("eps", [-1e-5, float("nan"), float("inf"), "0.1", True])
def test_bad_epsilon_names_the_parameter(eps):
    with pytest.raises(ConfigError, match="ram: parameter 'epsilon'"):
        Ram(epsilon=eps)


def test_weights_are_refused():
    base = torch.zeros(3)
    with pytest.raises(ConfigError, match="ram: per-expert weights"):
        merge(base, [base + 1, base + 2], weights=[1.0, 0.5])


def test_needs_a_base():
    with pytest.raises(ConfigError, match="needs a base model"):
        build_plan(None, [StateDictSource({KEY: torch.zeros(2)}, "e")], Ram())


def test_get_method_by_name():
    assert get_method("ram", epsilon=0.1) == Ram(epsilon=0.1)


# ------------------------------------------------------------------------------------------ YAML

def _cfg(**params):
    out = {"merge_method": "ram", "base_model": "base", "models": [{"model": "e0"}, {"model": "e1"}]}
    if params:
        out["parameters"] = params
    return out


def test_yaml_defaults_and_epsilon():
    assert parse_config(_cfg()).method == Ram(epsilon=1e-5)
    r = parse_config(_cfg(epsilon=0.01))
    assert r.method == Ram(epsilon=0.01) and r.base == "base" and r.experts == ["e0", "e1"]


def test_yaml_ignores_weight_and_per_model_epsilon_refuses_typos(caplog):
    c = _cfg()
    c["models"][0]["parameters"] = {"weight": 0.5}
    assert_ignored(c, _cfg(), caplog, "models[0].parameters.weight")
    c["models"][0]["parameters"] = {"epsilon": 0.5}
    assert_ignored(c, _cfg(), caplog, "models[0].parameters.epsilon (a global parameter of 'ram'")
    with pytest.raises(ConfigError, match="unknown parameter for 'ram'.*did you mean 'epsilon'"):
        parse_config(_cfg(epsilom=0.1))
    with pytest.raises(ConfigError, match="base_model: 'ram' needs base_model"):
        parse_config({"merge_method": "ram", "models": [{"model": "e0"}]})
    with pytest.raises(ConfigError, match="epsilon"):
        parse_config(_cfg(epsilon=-0.5))


# ------------------------------------------------------------------------------------------ parity


def _mergekit_kernel(base, deltas, **params):
    from mergekit.merge_methods.base import TensorEntry, TensorGroup
    from mergekit.merge_methods.ram import ram_merge

    entries = [TensorEntry("base", base.clone(), is_base=True)]
    entries += [TensorEntry(f"e{i}", base + d) for i, d in enumerate(deltas)]
    return ram_merge.implementation(TensorGroup(entries=entries), **params)


@pytest.mark.parity
@pytest.mark.parametrize("eps", [0.0, 1e-5, 0.1, 0.3])
def test_kernel_parity_with_mergekit(eps):
    parity_module()
    g = torch.Generator().manual_seed(1)
    for shape, n in [((5, 8), 1), ((16, 9), 2), ((33,), 3), ((0, 4), 2), ((4, 4), 4)]:
        base = torch.randn(shape, generator=g)
        # sparse deltas (a third of the entries changed) and one all-zero expert
        deltas = [torch.randn(shape, generator=g) * 0.3 * (torch.rand(shape, generator=g) < 0.35)
                  for _ in range(n)]
        deltas.append(torch.zeros(shape))
        ref = _mergekit_kernel(base, deltas, epsilon=eps)
        ours = merge(base, [base + d for d in deltas], epsilon=eps)
        assert_close_scaled(ours, ref, f"{shape} x{n} eps={eps}")


CONFIGS = {
    "defaults": {"models": [{"model": "e0"}, {"model": "e1"}]},
    "epsilon_base_listed": {"models": [{"model": "base"}, {"model": "e0"}, {"model": "e1"}, {"model": "e2"}],
                            "parameters": {"epsilon": 0.015}},
    "epsilon_filters_gradient": {
        "models": [{"model": "e0"}, {"model": "e2"}],
        "parameters": {"epsilon": [{"filter": "mlp", "value": [0.005, 0.04]}, {"filter": "embed", "value": 0.0},
                                   {"value": 0.02}]},
    },
}


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_end_to_end_parity_with_mergekit(name, llamas, tmp_path):
    p = parity_module()
    config = p._resolve({"merge_method": "ram", "base_model": "base", **CONFIGS[name]}, llamas)
    ours, ref = run_both(config, tmp_path)
    changed = assert_parity(ours, ref, name, base=p._load(llamas / "base"))
    assert changed
