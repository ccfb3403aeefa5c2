"""``multislerp``: exact vectors, edge cases, YAML translation, parity with mergekit 0.1.5.

Parity: mergekit's kernel on random, zero, colinear and empty tensors, and ``lightning-merge
merge`` vs ``run_merge`` on tiny random Llama models for every YAML option (``weight`` per model
with filters and gradients, ``normalize_weights``, ``eps``, with and without ``base_model``, one
model, the two-model fallback), asserted to |ours − mergekit| ≤ 1e-6 · max(1, max |mergekit|)
(the same float32 operations; in fact bit-identical). Where mergekit raises (the fallback with three
or more models) we return the linear combination: tested against mergekit's error.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from mergekit_helpers import (
    assert_close_scaled,
    assert_ignored,
    assert_parity,
    mergekit_config,
    parity_module,
    run_both,
)

from lightning_merge.engine import build_plan, run_plan
from lightning_merge.errors import ConfigError
from lightning_merge.mergekit import LayerIndex, parse_config
from lightning_merge.methods import TensorInputs
from lightning_merge.methods.multislerp import MultiSlerp
from lightning_merge.sources import StateDictSource

KEY = "model.layers.0.self_attn.q_proj.weight"


def merge(base, experts, weights=None, **params):
    """Through the engine (experts are full weights; ``base=None``: no base)."""
    b = None if base is None else StateDictSource({KEY: base}, "base")
    es = [StateDictSource({KEY: e}, f"e{i}") for i, e in enumerate(experts)]
    return dict(run_plan(build_plan(b, es, MultiSlerp(**params), weights=weights)))[KEY]


def reference(xs, w, normalize=True, eps=1e-8):
    """Float64, written from the formula: tangent-plane mean at the normalised mean direction,
    mapped back with the exponential map, times the weighted mean norm."""
    x = [v.double().reshape(-1) for v in xs]
    w = [float(a) for a in w]
    if normalize:
        s = sum(w)
        w = [a / s for a in w]
    n = [float(v.norm()) for v in x]
    u = [v / (nv + eps) for v, nv in zip(x, n)]
    m = sum(a * uv for a, uv in zip(w, u))
    m = m / m.norm()
    v = sum(a * (uv - float(uv @ m) * m) for a, uv in zip(w, u))
    r = float(v.norm()) + eps
    out = (math.cos(r) * m + math.sin(r) / r * v) * sum(a * nv for a, nv in zip(w, n))
    return out.reshape(xs[0].shape)


# ------------------------------------------------------------------------------------- exact values

def test_two_orthogonal_unit_vectors_give_the_midpoint():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    h = math.sqrt(0.5)
    torch.testing.assert_close(merge(None, [a, b]), torch.tensor([h, h]), rtol=0, atol=1e-7)
    # unnormalised weights 2, 2: the same direction, times Σ w n = 4
    torch.testing.assert_close(merge(None, [a, b], weights=[2.0, 2.0], normalize_weights=False),
                               torch.tensor([4 * h, 4 * h]), rtol=0, atol=1e-6)


def test_task_vectors_with_a_base():
    base = torch.tensor([5.0, -1.0])
    got = merge(base, [base + torch.tensor([3.0, 0.0]), base + torch.tensor([0.0, 1.0])])
    # unit vectors orthogonal with equal weights: the midpoint direction, times the mean norm 2
    h = math.sqrt(0.5)
    torch.testing.assert_close(got, base + 2 * torch.tensor([h, h]), rtol=0, atol=1e-6)


def test_matches_the_reference_formula():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 5, generator=g)
    xs = [torch.randn(4, 5, generator=g) * (i + 1) for i in range(4)]
    w = [1.0, 0.5, 0.25, 2.0]
    for normalize in (True, False):
        for eps in (1e-8, 0.5):
            got = merge(base, [base + x for x in xs], weights=w, normalize_weights=normalize, eps=eps)
            want = base.double() + reference(xs, w, normalize, eps)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # without a base (or task_vectors=False) the full weights are averaged
    full = reference([base + x for x in xs], w)
    torch.testing.assert_close(merge(None, [base + x for x in xs], weights=w).double(), full, rtol=1e-5, atol=1e-5)
    got = merge(base, [base + x for x in xs], weights=w, task_vectors=False)
    torch.testing.assert_close(got.double(), full, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ edge cases

def test_zero_deltas_give_the_base_for_any_count():
    base = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    for n in (2, 3, 5):  # mergekit: the linear fallback for 2, an error for 3 or more
        torch.testing.assert_close(merge(base, [base.clone() for _ in range(n)]), base, rtol=0, atol=0)


def test_balanced_antipodal_vectors_fall_back_to_the_linear_combination():
    a = torch.tensor([1.0, 2.0, -2.0])
    torch.testing.assert_close(merge(None, [a, -a]), torch.zeros(3), rtol=0, atol=1e-7)
    # three inputs, mean of the unit vectors 0: Σ w x with the normalised weights
    got = merge(None, [a, -a, torch.zeros(3)], weights=[1.0, 1.0, 2.0])
    torch.testing.assert_close(got, torch.zeros(3), rtol=0, atol=1e-7)
    got = merge(None, [a, -2 * a], weights=[2.0, 2.0], normalize_weights=False)
    torch.testing.assert_close(got, 2 * a - 4 * a, rtol=0, atol=1e-6)


def test_identical_and_colinear_inputs():
    a = torch.tensor([0.5, -1.0, 2.0])
    torch.testing.assert_close(merge(None, [a, a.clone(), a.clone()]), a, rtol=1e-6, atol=1e-6)
    # colinear: the direction of a, the weighted mean norm (1·1 + 3·3)/4 = 2.5 times |a|
    torch.testing.assert_close(merge(None, [a, 3 * a], weights=[1.0, 3.0]), 2.5 * a, rtol=1e-6, atol=1e-6)


def test_one_expert_is_returned_unchanged():
    base, x = torch.zeros(4), torch.arange(4.0)
    torch.testing.assert_close(merge(base, [x], weights=[0.3]), x, rtol=0, atol=0)
    m = MultiSlerp()
    assert torch.equal(m.merge(TensorInputs("w", torch.ones(2), [], [], [])), torch.ones(2))


def test_empty_tensor_and_dtype():
    assert merge(torch.zeros(0, 3), [torch.zeros(0, 3)] * 3).shape == (0, 3)
    base = torch.randn(4, 4).to(torch.bfloat16)
    es = [StateDictSource({"w": (base.float() + 0.01 * i).to(torch.bfloat16)}, f"e{i}") for i in (1, 2, 3)]
    out = dict(run_plan(build_plan(StateDictSource({"w": base}, "b"), es, MultiSlerp())))["w"]
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("params,pname", [({"eps": 0.0}, "eps"), ({"eps": -1.0}, "eps"), ({"eps": math.nan}, "eps"),
                                          ({"normalize_weights": 1}, "normalize_weights"),
                                          ({"task_vectors": None}, "task_vectors")])
def test_invalid_parameters_name_themselves(params, pname):
    with pytest.raises(ConfigError, match=f"multislerp: parameter '{pname}'"):
        MultiSlerp(**params)


def test_weights_summing_to_zero_are_refused_when_normalised():
    xs = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]
    with pytest.raises(ConfigError, match="sum to 0.*'weight'"):
        merge(None, xs, weights=[1.0, -1.0])
    assert torch.isfinite(merge(None, xs, weights=[1.0, -1.0], normalize_weights=False)).all()


# ------------------------------------------------------------------------------------------------ YAML

def cfg(base="base", models=("e0", "e1"), **params):
    return mergekit_config("multislerp", base, models, **params)


def test_yaml_translation():
    r = parse_config(cfg())
    assert r.method == MultiSlerp(normalize_weights=True, eps=1e-8, task_vectors=True)
    assert r.base == "base" and r.experts == ["e0", "e1"] and r.weights == [1.0, 1.0]
    r = parse_config(cfg(base=None, normalize_weights=False, eps=1e-4))
    assert r.method == MultiSlerp(normalize_weights=False, eps=1e-4, task_vectors=False)
    assert parse_config(cfg(models=("e0",))).experts == ["e0"]
    assert parse_config(cfg(models=("base", "e0", "e1", "e2"))).experts == ["e0", "e1", "e2"]
    c = cfg()
    c["models"] = [{"model": "e0", "parameters": {"weight": [0.0, 2.0]}}, {"model": "e1"}]
    r = parse_config(c)
    r.tensor_params.layer_index = LayerIndex([f"model.layers.{i}.x" for i in range(3)])
    assert r.tensor_params("model.layers.1.x")["weights"] == [1.0, 1.0]
    assert r.tensor_params("model.layers.2.x")["weights"] == [2.0, 1.0]


@pytest.mark.parametrize("config,match", [
    (cfg(models=("base",)), "'multislerp' needs at least 1 model"),
    (cfg(eps=0), r"parameter 'eps'"),
    (cfg(normalise_weights=True), "unknown parameter for 'multislerp'.*did you mean 'normalize_weights'"),
])
def test_yaml_errors(config, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(config)


def test_yaml_ignores_what_mergekit_ignores(caplog):
    assert_ignored(cfg(normalize=True), cfg(), caplog, "parameters.normalize")
    one = {**cfg(), "models": [{"model": "e0"}, {"model": "e1"}]}
    assert_ignored({**cfg(), "models": [{"model": "e0", "parameters": {"eps": 0.1}}, {"model": "e1"}]}, one, caplog,
                   "a global parameter of 'multislerp'")


# ------------------------------------------------------------------------------------------------ parity


def _mergekit_kernel(base, experts, weights, **params):
    from mergekit.merge_methods.base import PerInputValues, TensorEntry, TensorGroup
    from mergekit.merge_methods.multislerp import multislerp

    entries = [] if base is None else [TensorEntry("base", base.clone(), is_base=True)]
    entries += [TensorEntry(f"e{i}", x.clone()) for i, x in enumerate(experts)]
    w = PerInputValues([(f"e{i}", v) for i, v in enumerate(weights)])
    return multislerp.implementation(TensorGroup(entries=entries), weight=w, **params)


@pytest.mark.parity
@pytest.mark.parametrize("normalize,eps", [(True, 1e-8), (False, 1e-8), (True, 0.3)])
def test_kernel_parity_with_mergekit(normalize, eps):
    parity_module()
    g = torch.Generator().manual_seed(4)
    for shape in [(5, 8), (16,), (3, 4, 2), (0, 4)]:
        base = torch.randn(shape, generator=g)
        d = torch.randn(shape, generator=g)
        cases = [[d, torch.randn(shape, generator=g), torch.randn(shape, generator=g)], [d, 2 * d], [d, -d],
                 [d, torch.zeros(shape)], [torch.zeros(shape)] * 2, [d]]
        for deltas in cases:
            if shape == (0, 4) and len(deltas) > 2:
                continue  # mergekit: 'weighted sum is zero' error (empty tensors, more than 2 inputs)
            w = [1.0, 0.5, 0.25][:len(deltas)] if len(deltas) != 2 else [1.0, 1.0]
            for with_base in (True, False):
                experts = [base + x for x in deltas]
                ref = _mergekit_kernel(base if with_base else None, experts, w, normalize_weights=normalize, eps=eps)
                ours = MultiSlerp(normalize_weights=normalize, eps=eps).merge(TensorInputs(
                    KEY, base.clone() if with_base else None, [x.clone() for x in experts],
                    list(range(len(w))), w))
                assert_close_scaled(ours, ref, f"{shape} n={len(deltas)} base={with_base}")


@pytest.mark.parity
def test_mergekit_refuses_the_three_model_fallback_we_merge_to_the_base():
    parity_module()
    base = torch.randn(3, 4)
    with pytest.raises(ValueError, match="weighted sum of the input tensors is zero"):
        _mergekit_kernel(base, [base.clone()] * 3, [1.0, 1.0, 1.0])
    assert torch.equal(MultiSlerp().merge(TensorInputs(KEY, base, [base.clone() for _ in range(3)],
                                                       [0, 1, 2], [1.0] * 3)), base)


@pytest.fixture(scope="module")
def llamas(llamas):  # the session's models, plus two copies of the base
    root = llamas
    for copy in ("z0", "z1"):  # experts equal to the base: the two-model fallback on every tensor
        shutil.copytree(root / "base", root / copy)
    return root


THREE = [{"model": "e0", "parameters": {"weight": 1.0}}, {"model": "e1", "parameters": {"weight": 0.5}},
         {"model": "e2", "parameters": {"weight": 0.25}}]
CONFIGS = {
    "base": {"base_model": "base", "models": THREE},
    "no_base": {"models": THREE},
    "base_unnormalised_eps": {"base_model": "base", "models": THREE,
                              "parameters": {"normalize_weights": False, "eps": 1e-3}},
    "no_base_unnormalised": {"models": THREE[:2], "parameters": {"normalize_weights": False}},
    "base_listed_weight_filters_gradient": {
        "base_model": "base",
        "models": [{"model": "base"},
                   {"model": "e0", "parameters": {"weight": [{"filter": "mlp", "value": [0.1, 1.0]},
                                                             {"value": 1.0}]}},
                   {"model": "e1"}, {"model": "e2", "parameters": {"weight": 2.0}}],
        "parameters": {"weight": [{"filter": "self_attn", "value": 3.0}, {"value": 0.7}]}},
    "one_model": {"base_model": "base", "models": [{"model": "e1", "parameters": {"weight": 0.4}}]},
    "two_model_fallback": {"base_model": "base", "models": [{"model": "z0", "parameters": {"weight": 1.0}},
                                                            {"model": "z1", "parameters": {"weight": 1.0}}]},
}


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_end_to_end_parity_with_mergekit(name, llamas, tmp_path):
    p = parity_module()
    config = p._resolve({"merge_method": "multislerp", **CONFIGS[name]}, llamas)
    ours, ref = run_both(config, tmp_path)
    assert_parity(ours, ref, name)
    shutil.rmtree(tmp_path, ignore_errors=True)
