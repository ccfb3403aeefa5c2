"""``karcher``: exact vectors, edge cases, YAML translation, parity with mergekit 0.1.5.

On a circle the Karcher mean of directions is the weighted mean of their angles (when they lie
within a half circle), an independent reference; in higher dimensions the converged mean has a
vanishing Riemannian gradient (checked in float64). Parity: mergekit's kernel on random, zero,
tiny, colinear, antipodal, identical and empty tensors, and ``lightning-merge merge`` vs
``run_merge`` on tiny random Llama models for every YAML option (``max_iter``, ``tol``, with filters
and gradients; ``base_model`` as one more input, listed or not; no base), asserted to
|ours − mergekit| ≤ 1e-6 · max(1, max |mergekit|) (the same float32 operations; in fact
bit-identical).
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
from lightning_merge.methods.karcher import Karcher
from lightning_merge.sources import StateDictSource

KEY = "model.layers.0.self_attn.q_proj.weight"


def merge(experts, weights=None, base=None, **params):
    """Through the engine (experts are full weights)."""
    b = None if base is None else StateDictSource({KEY: base}, "base")
    es = [StateDictSource({KEY: e}, f"e{i}") for i, e in enumerate(experts)]
    return dict(run_plan(build_plan(b, es, Karcher(**params), weights=weights)))[KEY]


def polar(r: float, phi: float) -> torch.Tensor:
    return torch.tensor([r * math.cos(phi), r * math.sin(phi)])


# ------------------------------------------------------------------------------------- exact values

def test_on_a_circle_the_mean_angle():
    xs = [polar(1.0, 0.0), polar(2.0, 0.5), polar(3.0, 1.2)]
    # uniform: angle (0 + 0.5 + 1.2) / 3, norm (1 + 2 + 3) / 3
    torch.testing.assert_close(merge(xs), polar(2.0, 1.7 / 3), rtol=0, atol=1e-6)
    # weights (Python API): angle (3·0 + 1·1) / 4, norm (3·1 + 1·2) / 4
    got = merge([polar(1.0, 0.0), polar(2.0, 1.0)], weights=[3.0, 1.0])
    torch.testing.assert_close(got, polar(1.25, 0.25), rtol=0, atol=1e-6)
    # max_iter = 0: the normalised mean of the unit vectors (a different angle)
    start = math.atan2(sum(math.sin(p) for p in (0, 0.5, 1.2)), sum(math.cos(p) for p in (0, 0.5, 1.2)))
    torch.testing.assert_close(merge(xs, max_iter=0), polar(2.0, start), rtol=0, atol=1e-6)
    assert abs(start - 1.7 / 3) > 1e-3


def test_converged_mean_has_zero_riemannian_gradient():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(20, generator=g) + 1.0 for _ in range(4)]
    out = merge(xs, max_iter=50, tol=1e-9).double()
    mu = out / out.norm()
    grad = torch.zeros(20, dtype=torch.float64)
    for x in xs:
        u = x.double() / x.double().norm()
        c = float(u @ mu)
        grad += math.acos(c) / math.sqrt(1 - c * c) * (u - c * mu) / 4
    assert float(grad.norm()) < 1e-5
    assert float(out.norm()) == pytest.approx(sum(float(x.norm()) for x in xs) / 4, rel=1e-6)
    # the default tol = 1e-5 stops within about 1e-5 of it
    torch.testing.assert_close(merge(xs).double(), out, rtol=0, atol=1e-4)


def test_tol_sets_which_inputs_give_a_direction():
    a, tiny = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1e-6])
    # norm 1e-6 ≤ tol: left out of the direction, kept in the mean norm
    torch.testing.assert_close(merge([a, tiny]), torch.tensor([(1 + 1e-6) / 2, 0.0]), rtol=0, atol=1e-7)
    h = math.sqrt(0.5) * (1 + 1e-6) / 2
    torch.testing.assert_close(merge([a, tiny], tol=1e-7), torch.tensor([h, h]), rtol=0, atol=1e-7)


# ------------------------------------------------------------------------------------------ edge cases

def test_identical_colinear_zero_and_antipodal():
    a = torch.tensor([0.5, -1.0, 2.0])
    torch.testing.assert_close(merge([a, a.clone(), a.clone()]), a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(merge([a, 3 * a]), 2 * a, rtol=1e-6, atol=1e-6)  # direction a, norm 2|a|
    assert torch.equal(merge([torch.zeros(3), torch.zeros(3)]), torch.zeros(3))
    # one zero input: left out of the direction, averaged into the norm
    torch.testing.assert_close(merge([a, torch.zeros(3)]), 0.5 * a, rtol=1e-6, atol=1e-6)
    # a, −a: no mean direction; the first input's is kept (as in mergekit)
    torch.testing.assert_close(merge([a, -a]), a, rtol=1e-6, atol=1e-6)


def test_one_input_empty_missing_and_dtype():
    x = torch.randn(5)
    assert torch.equal(merge([x], weights=[0.2]), x)
    assert merge([torch.zeros(0, 3), torch.zeros(0, 3)]).shape == (0, 3)
    assert torch.equal(Karcher().merge(TensorInputs("w", torch.ones(2), [], [], [])), torch.ones(2))
    base = torch.randn(4, 4).to(torch.bfloat16)
    es = [StateDictSource({"w": (base.float() + 0.01 * i).to(torch.bfloat16)}, f"e{i}") for i in (1, 2, 3)]
    out = dict(run_plan(build_plan(StateDictSource({"w": base}, "b"), es, Karcher())))["w"]
    assert out.dtype == torch.bfloat16


def test_the_base_is_not_an_input_in_the_python_api():
    xs = [polar(1.0, 0.0), polar(1.0, 1.0)]
    torch.testing.assert_close(merge(xs, base=polar(5.0, 3.0)), merge(xs))


@pytest.mark.parametrize("params,pname", [({"max_iter": -1}, "max_iter"), ({"max_iter": 2.5}, "max_iter"),
                                          ({"max_iter": True}, "max_iter"), ({"tol": -1e-3}, "tol"),
                                          ({"tol": 0.0}, "tol"), ({"tol": math.inf}, "tol")])
def test_invalid_parameters_name_themselves(params, pname):
    with pytest.raises(ConfigError, match=f"karcher: parameter '{pname}'"):
        Karcher(**params)


def test_weights_must_be_non_negative_and_not_all_zero():
    xs = [polar(1.0, 0.0), polar(1.0, 1.0)]
    with pytest.raises(ConfigError, match="negative weights"):
        merge(xs, weights=[1.0, -0.5])
    with pytest.raises(ConfigError, match="sum to 0"):
        merge(xs, weights=[0.0, 0.0])
    with pytest.raises(ConfigError, match="weight 0"):  # the only input with a direction weighs 0
        merge([xs[0], torch.zeros(2)], weights=[0.0, 1.0])


# ------------------------------------------------------------------------------------------------ YAML

def cfg(base="base", models=("e0", "e1"), **params):
    return mergekit_config("karcher", base, models, **params)


def test_yaml_translation():
    r = parse_config(cfg())
    assert r.method == Karcher(max_iter=10, tol=1e-5)
    # base_model not listed: one more input (mergekit adds it; karcher averages every input)
    assert r.experts == ["e0", "e1", "base"] and r.weights == [1.0, 1.0, 1.0]
    assert any("base_model is averaged as one more input" in n for n in r.notes)
    assert parse_config(cfg(models=("base", "e0"))).experts == ["base", "e0"]
    r = parse_config(cfg(base=None, max_iter=3.0, tol=0.01))
    assert r.experts == ["e0", "e1"] and r.method == Karcher(max_iter=3, tol=0.01)
    assert parse_config(cfg(max_iter="4")).method.max_iter == 4
    r = parse_config(cfg(max_iter=[0, 10]))
    r.tensor_params.layer_index = LayerIndex([f"model.layers.{i}.x" for i in range(3)])
    assert [r.tensor_params(f"model.layers.{i}.x")["max_iter"] for i in range(3)] == [0, 5, 10]


@pytest.mark.parametrize("config,match", [
    (cfg(max_iter=2.5), r"parameter 'max_iter'"),
    (cfg(max_iter=[0, 3]), r"parameter 'max_iter'"),  # 1.5 in the middle layer
    (cfg(tol=-1), r"parameter 'tol'"),
    (cfg(max_itr=3), "unknown parameter for 'karcher'.*did you mean 'max_iter'"),
])
def test_yaml_errors(config, match):
    with pytest.raises(ConfigError, match=match):
        r = parse_config(config)
        if r.tensor_params is not None:
            r.check_tensors([f"model.layers.{i}.x" for i in range(3)])


def test_yaml_ignores_what_mergekit_ignores(caplog):
    one = {**cfg(), "models": [{"model": "e0"}]}
    assert_ignored({**cfg(), "models": [{"model": "e0", "parameters": {"weight": 0.5}}]}, one, caplog,
                   "models[0].parameters.weight")
    assert_ignored({**cfg(), "models": [{"model": "e0", "parameters": {"tol": 0.1}}]}, one, caplog,
                   "a global parameter of 'karcher'")


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parity
@pytest.mark.parametrize("max_iter,tol", [(10, 1e-5), (0, 1e-5), (3, 1e-2), (25, 1e-9)])
def test_kernel_parity_with_mergekit(max_iter, tol):
    parity_module()
    from mergekit.merge_methods.base import TensorEntry, TensorGroup
    from mergekit.merge_methods.karcher import karcher_merge_method

    g = torch.Generator().manual_seed(5)
    for shape in [(5, 8), (16,), (3, 4, 2), (0, 4)]:
        d = torch.randn(shape, generator=g) + 0.5
        cases = [[d, torch.randn(shape, generator=g), torch.randn(shape, generator=g) + 1], [d, 2 * d],
                 [d, -d], [d, torch.zeros(shape)], [torch.zeros(shape)] * 3, [d, d.clone(), d.clone()],
                 [d, torch.full(shape, 1e-7)], [d]]
        for xs in cases:
            entries = [TensorEntry(f"e{i}", x.clone()) for i, x in enumerate(xs)]
            ref = karcher_merge_method.implementation(TensorGroup(entries=entries), max_iter=max_iter, tol=tol)
            ours = Karcher(max_iter=max_iter, tol=tol).merge(TensorInputs(
                KEY, None, [x.clone() for x in xs], list(range(len(xs))), [1.0] * len(xs)))
            assert_close_scaled(ours, ref, f"{shape} n={len(xs)}")


THREE = [{"model": "e0"}, {"model": "e1"}, {"model": "e2"}]
CONFIGS = {
    "base_as_input": {"base_model": "base", "models": THREE},
    "no_base": {"models": THREE[:2]},
    "base_listed": {"base_model": "base", "models": [{"model": "base"}, *THREE[1:]],
                    "parameters": {"max_iter": 3, "tol": 1e-3}},
    "max_iter_0": {"models": THREE, "parameters": {"max_iter": 0}},
    "filters_and_gradient": {"base_model": "base", "models": THREE[:2],
                             "parameters": {"max_iter": [0, 10],
                                            "tol": [{"filter": "mlp", "value": 0.05}, {"value": 1e-6}]}},
}


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_end_to_end_parity_with_mergekit(name, llamas, tmp_path):
    p = parity_module()
    config = p._resolve({"merge_method": "karcher", **CONFIGS[name]}, llamas)
    ours, ref = run_both(config, tmp_path)
    assert_parity(ours, ref, name)
    shutil.rmtree(tmp_path, ignore_errors=True)
