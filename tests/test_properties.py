"""Property tests over every registered method (hypothesis): identities every merge must satisfy."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_merge.engine import build_plan, run_plan
from lightning_merge.methods import TensorInputs, get_method, method_class, method_names
from lightning_merge.sources import StateDictSource

#: every registered method that needs nothing but tensors (``sens_scaled`` needs a factors file and
#: has its own tests); what each one promises comes from its class (``contract``): registering a
#: method is what covers it here
CORE_METHODS = [n for n in method_names() if n != "sens_scaled"]


def contract(name: str):
    return method_class(name).contract


NO_DROP = {n: dict(contract(n).identity) for n in CORE_METHODS if contract(n).identity is not None}
TYPICAL = {n: dict(contract(n).typical) for n in CORE_METHODS}
SUM_METHODS = {n for n in CORE_METHODS if contract(n).sums}

shapes = st.tuples(st.integers(1, 5), st.integers(2, 9))
settings_ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tensors(shape, seed, n):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [torch.randn(shape, generator=g) * 0.1 for _ in range(n)]


def run(name, params, base, deltas, weights=None, seed=0):
    """Merge one tensor named 'model.layers.0.self_attn.q_proj.weight' through the engine."""
    key = "model.layers.0.self_attn.q_proj.weight"
    m = get_method(name, **params)
    b = StateDictSource({key: base}, "base")
    es = [StateDictSource({key: base + d}, f"e{i}") for i, d in enumerate(deltas)]
    return dict(run_plan(build_plan(b, es, m, weights=weights, seed=seed)))[key]


def n_experts(name):
    c = contract(name)
    return max(c.min_experts, min(3, c.max_experts or 3))


@pytest.mark.parametrize("name", [n for n in CORE_METHODS if contract(n).zero_deltas_give_base])
@given(shape=shapes, seed=st.integers(0, 2**16))
@settings_
def test_zero_deltas_give_the_base(name, shape, seed):
    base, deltas = tensors(shape, seed, n_experts(name))
    out = run(name, TYPICAL.get(name, {}), base, [torch.zeros_like(d) for d in deltas])
    torch.testing.assert_close(out, base, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", [n for n in NO_DROP if n in method_names()])
@given(shape=shapes, seed=st.integers(0, 2**16))
@settings_
def test_one_expert_weight_one_gives_the_expert(name, shape, seed):
    base, deltas = tensors(shape, seed, 1)
    out = run(name, NO_DROP[name], base, deltas[:1], weights=[1.0])
    torch.testing.assert_close(out, base + deltas[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(SUM_METHODS))
@given(shape=shapes, seed=st.integers(0, 2**16), lam=st.floats(0.1, 2.0))
@settings_
def test_no_drop_reduces_to_task_arithmetic(name, shape, seed, lam):
    if name not in method_names():
        pytest.skip(f"{name} not registered")
    base, deltas = tensors(shape, seed, 3)
    w = [1.0, 0.5, 2.0]
    got = run(name, {**NO_DROP[name], "lambda_": lam}, base, deltas, weights=w)
    want = run("task_arithmetic", {"lambda_": lam}, base, deltas, weights=w)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", CORE_METHODS)
@given(shape=shapes, seed=st.integers(0, 2**16))
@settings_
def test_shape_dtype_finite_and_deterministic(name, shape, seed):
    base, deltas = tensors(shape, seed, n_experts(name))
    params = TYPICAL.get(name, {})
    a = run(name, params, base.to(torch.bfloat16).float(), deltas, seed=seed)
    b = run(name, params, base.to(torch.bfloat16).float(), deltas, seed=seed)
    assert a.shape == base.shape and a.dtype == torch.float32
    assert bool(torch.isfinite(a).all())
    assert torch.equal(a, b)


def test_bf16_base_keeps_bf16():
    key = "w"
    base = torch.randn(4, 4).to(torch.bfloat16)
    es = [StateDictSource({key: (base.float() + 0.01).to(torch.bfloat16)}, "e")]
    out = dict(run_plan(build_plan(StateDictSource({key: base}, "b"), es, get_method("ties", density=0.5))))
    assert out[key].dtype == torch.bfloat16


def test_inputs_direct_call_matches_engine():
    base, deltas = tensors((3, 4), 0, 3)
    m = get_method("ties", density=0.5)
    name = "model.layers.0.self_attn.q_proj.weight"
    direct = m.merge(TensorInputs(name, base, [d.clone() for d in deltas], [0, 1, 2], [1, 1, 1]))
    torch.testing.assert_close(direct, run("ties", {"density": 0.5}, base, deltas))


@pytest.mark.parametrize("name", CORE_METHODS)
def test_per_expert_lists_of_one_value_equal_the_scalar(name):
    cls = method_class(name)
    params = TYPICAL.get(name, {})
    n = n_experts(name)
    listed = {k: [v] * n for k, v in params.items() if k in cls.per_expert_params}
    if not listed:
        pytest.skip(f"{name} has no per-expert parameter among its typical settings")
    base, deltas = tensors((4, 6), 3, n)
    torch.testing.assert_close(run(name, {**params, **listed}, base, deltas, seed=1),
                               run(name, params, base, deltas, seed=1), rtol=0, atol=0)


@pytest.mark.parametrize("name", CORE_METHODS)
def test_with_params_and_describe(name):
    import json

    m = get_method(name)
    typical = TYPICAL.get(name, {})
    assert m.with_params(**typical) == get_method(name, **typical)
    d = m.describe()
    assert d["method"] == name and json.loads(json.dumps(d, default=repr))["method"] == name
    if typical:
        assert get_method(name, **typical).describe() != d or typical == {k: d[k] for k in typical}


def _yaml_round_trip(cfg):
    import yaml

    from lightning_merge.mergekit import parse_config

    return parse_config(yaml.safe_load(yaml.safe_dump(cfg)))


def _experts(name):
    return [f"e{i}" for i in range(n_experts(name))]


@pytest.mark.parametrize("name", CORE_METHODS)
def test_yaml_round_trip(name):
    """Our YAML form of a method (typical settings, per-expert lists, weights) parses back to an
    equal method with the same weights."""
    from lightning_merge.mergekit.native import native_config

    cls = method_class(name)
    experts = _experts(name)
    params = dict(TYPICAL.get(name, {}))
    for k in cls.per_expert_params:  # a per-expert list where the method takes one
        if k in params and not isinstance(params[k], (list, tuple)) and len(experts) > 1:
            params[k] = [params[k]] * (len(experts) - 1) + [params[k] * 0.5]
    method = get_method(name, **params)
    weights = [1.0] + [0.5] * (len(experts) - 1)
    recipe = _yaml_round_trip(native_config(method, "base", experts, weights, seed=3))
    assert recipe.method == method and recipe.weights == weights and recipe.seed == 3
    assert recipe.experts == experts


MERGEKIT_FORMS = sorted({method_class(n).mergekit.name for n in CORE_METHODS if method_class(n).mergekit})


@pytest.mark.parametrize("mk_name", MERGEKIT_FORMS)
def test_mergekit_yaml_round_trips_through_the_native_form(mk_name):
    """A mergekit YAML (mergekit's defaults, plus ``t`` where required) → our method → our YAML →
    the same method: every translated setting, including those mergekit has no name for, is
    expressible in the native form."""
    from lightning_merge.mergekit.native import native_config
    from lightning_merge.mergekit.params import MERGEKIT_METHODS

    spec = MERGEKIT_METHODS[mk_name]
    n = spec.max_experts or max(spec.min_experts, 2)
    cfg = {"merge_method": mk_name, "models": [{"model": f"e{i}"} for i in range(n)]}
    if spec.base != "input":  # linear, karcher, passthrough: a base_model would be one more input
        cfg["base_model"] = "base"
    if "t" in spec.params:
        cfg["parameters"] = {"t": 0.3}
    first = _yaml_round_trip(cfg)
    base = None if spec.base == "input" else first.base  # there the recipe's base only donates config.json
    back = _yaml_round_trip(native_config(first.method, base, first.experts, first.weights))
    assert back.method == first.method and back.weights == first.weights and back.experts == first.experts


@pytest.mark.parametrize("name", CORE_METHODS)
def test_merged_delta_is_the_merge_minus_the_base(name):
    """``run_plan(delta=True)`` (what a PEFT adapter stores) gives θ* − θ₀ of the same merge, with
    the same random draws, and leaves copied tensors out."""
    key = "model.layers.0.self_attn.q_proj.weight"
    base, deltas = tensors((6, 5), 7, n_experts(name))
    b = StateDictSource({key: base, "steps": torch.tensor([3])}, "base")
    es = [StateDictSource({key: base + d}, f"e{i}") for i, d in enumerate(deltas)]
    m = get_method(name, **TYPICAL.get(name, {}))
    full = dict(run_plan(build_plan(b, es, m, seed=5)))
    delta = dict(run_plan(build_plan(b, es, m, seed=5), delta=True))
    assert set(delta) == {key} and delta[key].dtype == torch.float32
    torch.testing.assert_close(delta[key], full[key] - base, atol=1e-6, rtol=1e-5)


def test_a_loading_plan_needs_no_method():
    key = "w"
    base = torch.randn(3, 4)
    b = StateDictSource({key: base}, "base")
    es = [StateDictSource({key: base + 1.0}, "e0")]
    from lightning_merge.engine import load_inputs

    plan = build_plan(b, es, None, space="delta")
    torch.testing.assert_close(load_inputs(plan, plan.task(key)).tensors[0], torch.ones(3, 4), rtol=0, atol=1e-6)
    with pytest.raises(Exception, match="space='delta' or 'weight'"):
        build_plan(b, es, None)
