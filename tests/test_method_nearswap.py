"""``nearswap``: exact vectors, edge cases, YAML, parity with mergekit 0.1.5.

The independent reference is θ₀ + clamp(θ₁ − θ₀, −t, t) (the closed form of NearSwap wherever
|θ₁ − θ₀| ≥ 1e-6). Parity with mergekit is asserted as |ours − mergekit| ≤ 1e-6 · max(1, max
|mergekit|) (in practice bit-identical), on the kernel and end to end (``lightning-merge merge``
vs ``run_merge`` on tiny random Llama models) for every YAML option: ``t`` as a scalar, with
filters and a layer gradient, and base_model listed among the models.
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
from lightning_merge.methods.nearswap import Nearswap
from lightning_merge.sources import StateDictSource

KEY = "model.layers.0.mlp.up_proj.weight"


def merge(base, experts, weights=None, **params):
    b = StateDictSource({KEY: base}, "base")
    es = [StateDictSource({KEY: e}, f"e{i}") for i, e in enumerate(experts)]
    return dict(run_plan(build_plan(b, es, Nearswap(**params), weights=weights)))[KEY]


def _pair(shape=(6, 7), seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, base + torch.randn(shape, generator=g) * scale


# ------------------------------------------------------------------------------------------ exact values

def test_hand_vector():
    a = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    b = torch.tensor([1.25, 0.5, 3.0, 1.0, -1.0])
    # t = 0.5: |d| = 0.25, 0.5 ≤ t -> the expert; 2.0 -> a + 0.5; 0 -> a; 2.0 (down) -> a − 0.5
    want = torch.tensor([1.25, 0.5, 1.5, 1.0, 0.5])
    torch.testing.assert_close(merge(a, [b], t=0.5), want, rtol=0, atol=1e-7)


@pytest.mark.parametrize("t", [0.0, 0.01, 0.05, 0.2, 10.0])
def test_is_a_clamped_step_toward_the_expert(t):
    a, b = _pair()
    torch.testing.assert_close(merge(a, [b], t=t), a + (b - a).clamp(-t, t), rtol=0, atol=1e-6)


def test_below_the_floor_moves_a_fraction():
    a = torch.zeros(2)
    b = torch.tensor([4e-7, -2e-7])
    # |d| < 1e-6 uses the denominator 1e-6: w = t / 1e-6 = 0.5
    torch.testing.assert_close(merge(a, [b], t=5e-7), 0.5 * b, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------ edge cases

def test_t_zero_gives_the_base_and_large_t_the_expert():
    a, b = _pair()
    assert torch.equal(merge(a, [b], t=0.0), a)
    assert torch.equal(merge(a, [b], t=1e6), b)


def test_identical_models_give_that_model():
    a, _ = _pair()
    torch.testing.assert_close(merge(a, [a.clone()], t=0.3), a, rtol=0, atol=0)


def test_empty_and_missing_tensors():
    a = torch.zeros(0, 3)
    assert merge(a, [a.clone()], t=0.1).shape == (0, 3)
    b = torch.randn(3)
    assert torch.equal(Nearswap().merge(TensorInputs(KEY, b, [], [], [])), b)


def test_engine_keeps_bfloat16():
    a, b = (x.to(torch.bfloat16) for x in _pair((4, 4)))
    out = dict(run_plan(build_plan(StateDictSource({KEY: a}, "b"), [StateDictSource({KEY: b}, "e")],
                                   Nearswap(t=0.05))))[KEY]
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("t", [-0.1, float("nan"), float("inf")])
def test_bad_t_names_the_parameter(t):
    with pytest.raises(ConfigError, match="nearswap: parameter 't'"):
        Nearswap(t=t)


def test_expert_count_weights_and_base():
    a, b = _pair()
    with pytest.raises(ConfigError, match="exactly one expert"):
        merge(a, [b, b.clone()], t=0.1)
    with pytest.raises(ConfigError, match="weights"):
        merge(a, [b], weights=[0.5], t=0.1)
    with pytest.raises(ConfigError, match="base"):
        Nearswap().merge(TensorInputs(KEY, None, [b], [0], [1.0]))


def test_get_method_by_name():
    assert get_method("nearswap", t=0.2) == Nearswap(t=0.2) and Nearswap().t == 1e-4


# ------------------------------------------------------------------------------------------ YAML

def _cfg(models=("e0",), **params):
    out = {"merge_method": "nearswap", "base_model": "base", "models": [{"model": m} for m in models]}
    return {**out, "parameters": params} if params else out


def test_yaml(caplog):
    r = parse_config(_cfg(t=0.001))
    assert r.method == Nearswap(t=0.001) and r.experts == ["e0"]
    assert parse_config(_cfg(models=("base", "e0"), t=0.5)).experts == ["e0"]
    with pytest.raises(ConfigError, match=r"parameters\.t: 'nearswap' needs 't' \(the largest step"):
        parse_config(_cfg())
    with pytest.raises(ConfigError, match="exactly 1 model"):
        parse_config(_cfg(models=("e0", "e1"), t=0.1))
    plain = {**_cfg(t=0.1), "models": [{"model": "e0"}]}
    assert_ignored({**plain, "models": [{"model": "e0", "parameters": {"weight": 0.5}}]}, plain, caplog,
                   "models[0].parameters.weight")
    assert_ignored({**plain, "models": [{"model": "e0", "parameters": {"t": 0.5}}]}, plain, caplog,
                   "models[0].parameters.t (a global parameter of 'nearswap'")
    with pytest.raises(ConfigError, match="'t'"):
        parse_config(_cfg(t=-1.0))


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parity
@pytest.mark.parametrize("t", [0.0, 1e-7, 0.01, 0.1, 5.0])
def test_kernel_parity_with_mergekit(t):
    parity_module()
    from mergekit.merge_methods.base import TensorEntry, TensorGroup
    from mergekit.merge_methods.nearswap import nearswap_merge

    for shape, scale in [((5, 8), 0.1), ((33,), 1.0), ((4, 4), 1e-7), ((3, 3), 0.0)]:
        a, b = _pair(shape, seed=len(shape), scale=scale)
        group = TensorGroup(entries=[TensorEntry("base", a.clone(), is_base=True), TensorEntry("e", b.clone())])
        assert_close_scaled(merge(a, [b], t=t), nearswap_merge.implementation(group, t=t), f"{shape} t={t}")


CONFIGS = {
    "scalar": {"models": [{"model": "e1"}], "parameters": {"t": 0.01}},
    "base_listed": {"models": [{"model": "base"}, {"model": "e2"}], "parameters": {"t": 0.004}},
    "filters_gradient": {
        "models": [{"model": "e0"}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.02]}, {"filter": "mlp", "value": 0.5},
                             {"value": 0.005}]},
    },
}


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_end_to_end_parity_with_mergekit(name, llamas, tmp_path):
    p = parity_module()
    config = p._resolve({"merge_method": "nearswap", "base_model": "base", **CONFIGS[name]}, llamas)
    ours, ref = run_both(config, tmp_path)
    changed = assert_parity(ours, ref, name, base=p._load(llamas / "base"))
    assert changed
