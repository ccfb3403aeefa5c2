"""``sce`` (Select-Calculate-Erase): exact vectors, edge cases, YAML, parity with mergekit 0.1.5.

The reference in this file is an independent float64 loop over entries. Parity with mergekit is
asserted as |ours − mergekit| ≤ 1e-6 · max(1, max |mergekit|) (in practice the tensors are
bit-identical: the same float32 operations), on the kernel (random tensors, zero experts, tiny
deltas that trigger mergekit's uniform-coefficient fallback) and end to end (``lightning-merge
merge`` vs ``run_merge`` on tiny random Llama models) for every YAML option: ``select_topk``
(scalar, filters, gradient), ``int8_mask``, base_model listed among the models, one expert.
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
from lightning_merge.methods.sce import Sce, sce_select_mask
from lightning_merge.sources import StateDictSource

KEY = "model.layers.0.mlp.up_proj.weight"


def merge(base, experts, weights=None, **params):
    """Through the engine: experts are full weights θ_t."""
    b = StateDictSource({KEY: base}, "base")
    es = [StateDictSource({KEY: e}, f"e{i}") for i, e in enumerate(experts)]
    return dict(run_plan(build_plan(b, es, Sce(**params), weights=weights)))[KEY]


def reference(base, experts, select_topk=1.0, uniform_below=1e-6):
    """SCE entry by entry in float64 (Python lists), ties in the variance to the lower index."""
    b = base.double().flatten().tolist()
    deltas = [(e.double() - base.double()).flatten().tolist() for e in experts]
    n, T = len(b), len(deltas)
    if select_topk < 1.0:
        var = []
        for j in range(n):
            col = [d[j] for d in deltas]
            mu = sum(col) / T
            var.append(sum((x - mu) ** 2 for x in col) / T)
        k = int(sum(v != 0 for v in var) * select_topk)
        keep = set(sorted(range(n), key=lambda j: (-var[j], j))[:k])
        deltas = [[x if j in keep else 0.0 for j, x in enumerate(d)] for d in deltas]
    s = [sum(x * x for x in d) / n for d in deltas]
    c = [1.0 / T] * T if sum(s) < uniform_below or sum(s) == 0 else [v / sum(s) for v in s]
    out = []
    for j in range(n):
        gamma = 1 if sum(d[j] for d in deltas) >= 0 else -1
        agree = [t for t in range(T) if deltas[t][j] != 0 and (deltas[t][j] > 0) == (gamma > 0)]
        num = sum(c[t] * deltas[t][j] for t in agree)
        den = max(sum(c[t] for t in agree), 1e-6)
        out.append(b[j] + num / den)
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape).float()


def _experts(shape, n, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + torch.randn(shape, generator=g) * scale * (i + 1) for i in range(n)]


# ------------------------------------------------------------------------------------------ exact values

def test_hand_vector():
    base = torch.zeros(4)
    d1 = torch.tensor([1.0, -2.0, 0.0, 1.0])
    d2 = torch.tensor([3.0, 1.0, 2.0, -3.0])
    # mean squares 6/4 and 23/4 -> c = (6/29, 23/29); signs: sums 4, -1, 2, -2 -> gamma +, -, +, -
    c1, c2 = 6 / 29, 23 / 29
    want = torch.tensor([(c1 * 1 + c2 * 3) / (c1 + c2), -2.0, 2.0, -3.0])
    torch.testing.assert_close(merge(base, [d1, d2]), want, rtol=0, atol=1e-6)


def test_hand_vector_select():
    base = torch.zeros(5)
    d1 = torch.tensor([1.0, 0.0, 4.0, 2.0, 5.0])
    d2 = torch.tensor([1.0, 2.0, 0.0, 2.5, -5.0])
    # variances 0, 1, 4, 0.0625, 25: nnz = 4, k = floor(4 * 0.5) = 2 -> entries 4 and 2 kept
    mask = sce_select_mask(torch.stack([d1, d2]), 0.5)
    assert mask.tolist() == [False, False, True, False, True]
    # kept: d1 = [0, 0, 4, 0, 5], d2 = [0, 0, 0, 0, -5]; c ∝ (41, 25); entry 4: sum 0 -> gamma +1
    torch.testing.assert_close(merge(base, [d1, d2], select_topk=0.5), torch.tensor([0.0, 0.0, 4.0, 0.0, 5.0]))


@pytest.mark.parametrize("select_topk", [1.0, 0.7, 0.3, 0.05])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_matches_an_independent_reference(select_topk, n):
    base, experts = _experts((6, 7), n, seed=n)
    torch.testing.assert_close(merge(base, experts, select_topk=select_topk),
                               reference(base, experts, select_topk), rtol=1e-5, atol=1e-6)


def test_colinear_experts_weight_by_mean_square():
    base, (e,) = _experts((3, 5), 1)
    d = e - base
    # δ and 2δ: c = (1/5, 4/5), both agree everywhere: (1/5 δ + 4/5 · 2δ) = 1.8 δ
    torch.testing.assert_close(merge(base, [base + d, base + 2 * d]), base + 1.8 * d, rtol=1e-6, atol=1e-6)


def test_opposite_experts_keep_the_positive_side():
    base = torch.zeros(4)
    d = torch.tensor([1.0, -2.0, 3.0, -4.0])
    # Σ = 0 everywhere -> gamma = +1: the positive entry of each pair wins, whole
    torch.testing.assert_close(merge(base, [d, -d]), d.abs())


def test_uniform_fallback_for_small_task_vectors():
    base, experts = _experts((8, 8), 2, scale=1e-4)  # Σ mean δ² ≈ 5e-8 < 1e-6
    mergekit_like = merge(base, experts)
    torch.testing.assert_close(mergekit_like, reference(base, experts, uniform_below=float("inf")))
    scale_free = merge(base, experts, uniform_below=0.0)
    torch.testing.assert_close(scale_free, reference(base, experts, uniform_below=0.0))
    assert not torch.allclose(scale_free, mergekit_like, rtol=0, atol=1e-9)


def test_variance_ties_go_to_the_lower_index():
    d1 = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.0, 0.0])
    mask = sce_select_mask(torch.stack([d1, -d1]), 0.5)  # four equal variances, k = 2
    assert mask.tolist() == [True, True, False, False, False, False]


# ------------------------------------------------------------------------------------------ edge cases

def test_zero_deltas_give_the_base():
    base = torch.randn(4, 5)
    for k in (1.0, 0.5):
        assert torch.equal(merge(base, [base.clone(), base.clone()], select_topk=k), base)


def test_one_expert():
    base, (e,) = _experts((4, 5), 1)
    torch.testing.assert_close(merge(base, [e]), e, rtol=0, atol=1e-6)
    # one expert has zero variance everywhere: any selection keeps nothing (mergekit too)
    assert torch.equal(merge(base, [e], select_topk=0.9), base)


def test_identical_experts():
    base, (e,) = _experts((4, 5), 1)
    torch.testing.assert_close(merge(base, [e, e.clone()]), e, rtol=0, atol=1e-6)
    assert torch.equal(merge(base, [e, e.clone()], select_topk=0.5), base)


def test_select_topk_zero_gives_the_base():
    base, experts = _experts((4, 5), 3)
    assert torch.equal(merge(base, experts, select_topk=0.0), base)


def test_empty_and_missing_tensors():
    base = torch.zeros(0, 4)
    assert merge(base, [base.clone(), base.clone()], select_topk=0.5).shape == (0, 4)
    m = Sce()
    b = torch.randn(3)
    assert torch.equal(m.merge(TensorInputs(KEY, b, [], [], [])), b)


def test_engine_keeps_bfloat16():
    base, experts = _experts((4, 6), 2)
    bf = [t.to(torch.bfloat16) for t in (base, *experts)]
    b = StateDictSource({KEY: bf[0]}, "base")
    es = [StateDictSource({KEY: e}, f"e{i}") for i, e in enumerate(bf[1:])]
    out = dict(run_plan(build_plan(b, es, Sce(select_topk=0.5))))[KEY]
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("params,pname", [({"select_topk": 1.5}, "select_topk"), ({"select_topk": -0.1}, "select_topk"),
                                          ({"select_topk": float("nan")}, "select_topk"),
                                          ({"uniform_below": -1.0}, "uniform_below")])
def test_bad_parameters_name_the_parameter(params, pname):
    with pytest.raises(ConfigError, match=f"sce: parameter '{pname}'"):
        Sce(**params)


def test_weights_are_refused_and_a_base_is_needed():
    base, experts = _experts((3, 3), 2)
    with pytest.raises(ConfigError, match="weights"):
        merge(base, experts, weights=[1.0, 0.5])
    with pytest.raises(ConfigError, match="base"):
        Sce().merge(TensorInputs(KEY, None, [torch.ones(3)], [0], [1.0]))


def test_get_method_by_name():
    assert get_method("sce", select_topk=0.2) == Sce(select_topk=0.2)


# ------------------------------------------------------------------------------------------ YAML

def _cfg(models=("e0", "e1"), **params):
    out = {"merge_method": "sce", "base_model": "base", "models": [{"model": m} for m in models]}
    return {**out, "parameters": params} if params else out


def test_yaml_defaults_and_options():
    r = parse_config(_cfg())
    assert r.method == Sce(select_topk=1.0, uniform_below=1e-6) and r.experts == ["e0", "e1"]
    r = parse_config(_cfg(models=("base", "e0", "e1", "e2"), select_topk=0.25, int8_mask=True))
    assert r.method.select_topk == 0.25 and r.experts == ["e0", "e1", "e2"]


def test_yaml_ignores_what_mergekit_ignores(caplog):
    for params in ({"normalize": True}, {"lambda": 0.5}, {"density": 0.5}):
        assert_ignored(_cfg(**params), _cfg(), caplog, f"parameters.{next(iter(params))}")
    one = {**_cfg(), "models": [{"model": "e0"}]}
    assert_ignored({**_cfg(), "models": [{"model": "e0", "parameters": {"weight": 0.5}}]}, one, caplog,
                   "models[0].parameters.weight")
    assert_ignored({**_cfg(), "models": [{"model": "e0", "parameters": {"select_topk": 0.5}}]}, one, caplog,
                   "a global parameter of 'sce'")
    with pytest.raises(ConfigError, match="unknown parameter for 'sce'.*did you mean 'select_topk'"):
        parse_config(_cfg(selct_topk=0.5))
    with pytest.raises(ConfigError, match="base_model"):
        parse_config({"merge_method": "sce", "models": [{"model": "e0"}]})
    with pytest.raises(ConfigError, match="select_topk"):
        parse_config(_cfg(select_topk=2.0))


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parity
@pytest.mark.parametrize("select_topk", [1.0, 0.6, 0.2, 0.0])
def test_kernel_parity_with_mergekit(select_topk):
    parity_module()
    from mergekit.merge_methods.base import TensorEntry, TensorGroup
    from mergekit.merge_methods.sce import sce_merge

    g = torch.Generator().manual_seed(2)
    for shape, n, scale in [((5, 8), 1, 0.1), ((16, 9), 2, 0.1), ((33,), 3, 0.3), ((4, 4), 4, 1e-4), ((7, 3), 2, 0.0)]:
        base = torch.randn(shape, generator=g)
        experts = [base + torch.randn(shape, generator=g) * scale for _ in range(n)] + [base.clone()]
        for int8 in (False, True):
            group = TensorGroup(entries=[TensorEntry("base", base.clone(), is_base=True)]
                                + [TensorEntry(f"e{i}", e.clone()) for i, e in enumerate(experts)])
            ref = sce_merge.implementation(group, int8_mask=int8, select_topk=select_topk)
            assert_close_scaled(merge(base, experts, select_topk=select_topk), ref, f"{shape} x{n} k={select_topk}")


CONFIGS = {
    "defaults": {"models": [{"model": "e0"}, {"model": "e1"}, {"model": "e2"}]},
    "select_base_listed_int8": {"models": [{"model": "base"}, {"model": "e0"}, {"model": "e2"}],
                                "parameters": {"select_topk": 0.3, "int8_mask": True}},
    "select_filters_gradient": {
        "models": [{"model": "e0"}, {"model": "e1"}, {"model": "e2"}],
        "parameters": {"select_topk": [{"filter": "mlp", "value": [0.1, 0.9]}, {"filter": "embed", "value": 1.0},
                                       {"value": 0.5}]},
    },
    "one_expert": {"models": [{"model": "e1"}], "parameters": {"select_topk": 0.5}},
}


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_end_to_end_parity_with_mergekit(name, llamas, tmp_path):
    p = parity_module()
    config = p._resolve({"merge_method": "sce", "base_model": "base", **CONFIGS[name]}, llamas)
    ours, ref = run_both(config, tmp_path)
    changed = assert_parity(ours, ref, name, base=p._load(llamas / "base"))
    assert changed == (name != "one_expert")
