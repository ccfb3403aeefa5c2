"""``nuslerp``: exact vectors, edge cases, YAML translation, parity with mergekit 0.1.5.

Parity: mergekit's kernel on random, zero, colinear, antipodal and empty tensors, and
``lightning-merge merge`` vs ``run_merge`` on tiny random Llama models for every YAML option
(``weight`` per model with filters, ``nuslerp_flatten``, ``nuslerp_row_wise``, with and without
``base_model``), asserted to |ours − mergekit| ≤ 1e-6 · max(1, max |mergekit|) (both compute the
same float32 operations; the results are in fact bit-identical).
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
from lightning_merge.methods import TensorInputs, get_method
from lightning_merge.methods.nuslerp import NuSlerp
from lightning_merge.sources import StateDictSource

KEY = "model.layers.0.self_attn.q_proj.weight"


def merge(base, experts, weights=None, **params):
    """Through the engine (experts are full weights; ``base=None``: no base)."""
    b = None if base is None else StateDictSource({KEY: base}, "base")
    es = [StateDictSource({KEY: e}, f"e{i}") for i, e in enumerate(experts)]
    return dict(run_plan(build_plan(b, es, NuSlerp(**params), weights=weights)))[KEY]


def ref_slerp(t: float, a, b):
    """Float64 reference on two 1-D vectors: rotate a's direction towards b's in their plane."""
    a, b = a.double(), b.double()
    na, nb = a.norm(), b.norm()
    c = float((a / na.clamp(min=1e-7)) @ (b / nb.clamp(min=1e-7))) if a.numel() else 0.0
    c = max(-1.0, min(1.0, c))
    if 1 - c * c <= 1e-16:
        return (1 - t) * a + t * b
    om = math.acos(c)
    return (math.sin((1 - t) * om) * a + math.sin(t * om) * b) / math.sin(om)


# ------------------------------------------------------------------------------------- exact values

def test_orthogonal_unit_vectors_hand_values():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # t = 1/(1+1) = 0.5, Ω = π/2: (sin(π/4), sin(π/4))
    h = math.sqrt(0.5)
    torch.testing.assert_close(merge(None, [a, b]), torch.tensor([h, h]), rtol=0, atol=1e-7)
    # weights 1 and 3: t = 0.75 -> (sin(π/8), sin(3π/8))
    torch.testing.assert_close(merge(None, [a, b], weights=[1.0, 3.0]),
                               torch.tensor([math.sin(math.pi / 8), math.sin(3 * math.pi / 8)]),
                               rtol=0, atol=1e-7)


def test_task_vectors_with_a_base_hand_values():
    base = torch.tensor([1.0, 1.0])
    e0, e1 = base + torch.tensor([2.0, 0.0]), base + torch.tensor([0.0, 3.0])
    # t = 0.75, δ's orthogonal: θ₀ + sin(π/8)·δ₁ + sin(3π/8)·δ₂ (the unnormalised vectors)
    want = base + torch.tensor([2 * math.sin(math.pi / 8), 3 * math.sin(3 * math.pi / 8)])
    torch.testing.assert_close(merge(base, [e0, e1], weights=[1.0, 3.0]), want, rtol=0, atol=1e-6)
    # task_vectors=False: the full weights [3, 1] and [1, 4] are interpolated, the base is unused
    got = merge(base, [e0, e1], weights=[1.0, 3.0], task_vectors=False)
    torch.testing.assert_close(got, ref_slerp(0.75, e0, e1).float(), rtol=0, atol=1e-6)


def test_whole_tensor_rows_and_columns_match_the_reference():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    e0, e1 = base + torch.randn(4, 6, generator=g), base + torch.randn(4, 6, generator=g)
    d0, d1, t = e0 - base, e1 - base, 0.6 / 1.6
    whole = base + ref_slerp(t, d0.reshape(-1), d1.reshape(-1)).reshape(4, 6)
    rows = base + torch.stack([ref_slerp(t, d0[i], d1[i]) for i in range(4)])
    cols = base + torch.stack([ref_slerp(t, d0[:, j], d1[:, j]) for j in range(6)], 1)
    for dim, want in ((None, whole), (-1, rows), (0, cols)):
        got = merge(base, [e0, e1], weights=[1.0, 0.6], dim=dim)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    assert not torch.allclose(rows, cols)


def test_t_from_the_weights():
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])
    torch.testing.assert_close(merge(None, [a, b], weights=[2.0, 0.0]), a, rtol=0, atol=1e-7)  # t = 0
    torch.testing.assert_close(merge(None, [a, b], weights=[0.0, 5.0]), b, rtol=0, atol=1e-6)  # t = 1
    # weights summing to ~0: t = 0.5 (mergekit's rule)
    torch.testing.assert_close(merge(None, [a, b], weights=[1.0, -1.0]), merge(None, [a, b]))
    # a negative weight extrapolates: t = -0.5 / 0.5 = -1
    torch.testing.assert_close(merge(None, [a, b], weights=[1.0, -0.5]).double(), ref_slerp(-1.0, a, b),
                               rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ edge cases

def test_colinear_and_antipodal_are_linear():
    a = torch.tensor([0.0, -2.0, 0.0])  # cos rounds to exactly ±1 in float32
    for b in (3 * a, -a, a.clone()):
        torch.testing.assert_close(merge(None, [a, b], weights=[1.0, 0.25]), 0.8 * a + 0.2 * b,
                                   rtol=0, atol=1e-6)
    # nearly antipodal (cos = −1 + 6e-8 in float32) is spherical: the limit of
    # (sin(0.8Ω) − sin(0.2Ω)) / sin Ω at Ω = π is 0.8 cos(0.2π) + 0.2 cos(0.2π) = cos(0.2π), not 0.6
    a = torch.tensor([1.0, -2.0, 0.5])
    torch.testing.assert_close(merge(None, [a, -a], weights=[1.0, 0.25]), math.cos(0.2 * math.pi) * a,
                               rtol=0, atol=2e-3)


def test_zero_deltas():
    base = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(merge(base, [base.clone(), base.clone()]), base, rtol=0, atol=0)
    # one zero task vector: c = 0, Ω = π/2, so θ₀ + sin(t·π/2)·δ (as in mergekit)
    d = torch.ones(3, 5)
    got = merge(base, [base.clone(), base + d], weights=[1.0, 1.0])
    torch.testing.assert_close(got, base + math.sin(math.pi / 4) * d, rtol=0, atol=1e-6)


def test_empty_and_one_dimensional_tensors():
    assert merge(None, [torch.zeros(0, 4), torch.zeros(0, 4)], dim=0).shape == (0, 4)
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    for dim in (None, -1, 0):  # a 1-D tensor is one vector whatever dim says
        torch.testing.assert_close(merge(None, [v0, v1], dim=dim), merge(None, [v0, v1]))


def test_missing_tensor_and_dtype():
    m = NuSlerp()
    x = torch.randn(3)
    assert torch.equal(m.merge(TensorInputs("w", torch.zeros(3), [x], [1], [1.0])), x)  # one expert has it
    assert torch.equal(m.merge(TensorInputs("w", torch.ones(3), [], [], [])), torch.ones(3))
    base = torch.randn(4, 4).to(torch.bfloat16)
    es = [StateDictSource({"w": (base.float() + 0.01 * i).to(torch.bfloat16)}, f"e{i}") for i in (1, 2)]
    out = dict(run_plan(build_plan(StateDictSource({"w": base}, "b"), es, NuSlerp())))["w"]
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("params,pname", [({"dim": 1}, "dim"), ({"dim": 0.0}, "dim"), ({"dim": True}, "dim"),
                                          ({"task_vectors": "yes"}, "task_vectors")])
def test_invalid_parameters_name_themselves(params, pname):
    with pytest.raises(ConfigError, match=f"nuslerp: parameter '{pname}'"):
        NuSlerp(**params)


def test_exactly_two_experts():
    x = torch.ones(2)
    for n in (1, 3):
        with pytest.raises(ConfigError, match="exactly two experts"):
            build_plan(StateDictSource({"w": x}, "b"), [StateDictSource({"w": x}, f"e{i}") for i in range(n)],
                       NuSlerp())


# ------------------------------------------------------------------------------------------------ YAML

def cfg(base="base", models=("e0", "e1"), **params):
    return mergekit_config("nuslerp", base, models, **params)


def test_yaml_translation():
    r = parse_config(cfg())
    assert r.method == NuSlerp(dim=None, task_vectors=True) and r.weights == [1.0, 1.0]
    assert r.base == "base" and r.experts == ["e0", "e1"]
    assert parse_config(cfg(nuslerp_flatten=False)).method.dim == -1
    assert parse_config(cfg(nuslerp_flatten=False, nuslerp_row_wise=True)).method.dim == 0
    assert parse_config(cfg(nuslerp_row_wise=True)).method.dim is None  # flatten wins, as in mergekit
    # no base_model: the full weights; the first model only donates the config
    r = parse_config(cfg(base=None))
    assert r.method.task_vectors is False and r.experts == ["e0", "e1"]
    # base_model listed among the models is the base, not an input
    assert parse_config(cfg(models=("base", "e0", "e1"))).experts == ["e0", "e1"]
    c = cfg()
    c["models"] = [{"model": "e0", "parameters": {"weight": [{"filter": "mlp", "value": 3.0}, {"value": 1.0}]}},
                   {"model": "e1", "parameters": {"weight": 0.5}}]
    r = parse_config(c)
    r.tensor_params.layer_index = LayerIndex(["model.layers.0.x"])
    assert r.tensor_params("model.layers.0.mlp.up_proj.weight")["weights"] == [3.0, 0.5]
    assert r.tensor_params("model.layers.0.self_attn.q_proj.weight") == {"dim": None, "task_vectors": True,
                                                                         "weights": [1.0, 0.5]}


@pytest.mark.parametrize("config,match", [
    (cfg(models=("e0",)), "'nuslerp' needs exactly 2 model"),
    (cfg(models=("e0", "e1", "e2")), "'nuslerp' needs exactly 2 model"),
    (cfg(models=("base", "e0")), "'nuslerp' needs exactly 2 model"),
    (cfg(nuslerp_flaten=True), "unknown parameter for 'nuslerp'.*did you mean 'nuslerp_flatten'"),
    (cfg(task_vectors=False), "no mergekit equivalent"),
    (cfg(dim=0), "nuslerp_row_wise: true"),
])
def test_yaml_errors(config, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(config)


def test_yaml_ignores_what_mergekit_ignores(caplog):
    assert_ignored(cfg(t=0.5), cfg(), caplog, "parameters.t")
    two = {**cfg(), "models": [{"model": "e0"}, {"model": "e1"}]}
    assert_ignored({**cfg(), "models": [{"model": "e0", "parameters": {"nuslerp_flatten": False}}, {"model": "e1"}]},
                   two, caplog, "a global parameter of 'nuslerp'")


def test_get_method_and_describe():
    assert get_method("nuslerp", dim=-1).describe() == {"method": "nuslerp", "dim": -1, "task_vectors": True}


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parity
@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True), (True, True)])
def test_kernel_parity_with_mergekit(flatten, row_wise):
    parity_module()
    from mergekit.merge_methods.base import PerInputValues, TensorEntry, TensorGroup
    from mergekit.merge_methods.nuslerp import nuslerp_merge_method

    dim = None if flatten else (0 if row_wise else -1)
    g = torch.Generator().manual_seed(3)
    for shape in [(5, 8), (16,), (3, 4, 2), (0, 4)]:
        base = torch.randn(shape, generator=g)
        d = torch.randn(shape, generator=g)
        for other in (torch.randn(shape, generator=g), 2 * d, -d, torch.zeros(shape), d.clone()):
            for w in ([1.0, 0.3], [0.2, 1.0], [1.0, -1.0], [1.0, -0.4]):
                for with_base in (True, False):
                    entries = [TensorEntry("base", base.clone(), is_base=True)] if with_base else []
                    entries += [TensorEntry("a", base + d), TensorEntry("b", base + other)]
                    ref = nuslerp_merge_method.implementation(
                        TensorGroup(entries=entries), weight=PerInputValues([("a", w[0]), ("b", w[1])]),
                        nuslerp_row_wise=row_wise, nuslerp_flatten=flatten)
                    ours = NuSlerp(dim=dim).merge(TensorInputs(
                        KEY, base.clone() if with_base else None, [base + d, base + other], [0, 1], w))
                    assert_close_scaled(ours, ref, f"{shape} w={w} base={with_base}")


W2 = [{"model": "e0", "parameters": {"weight": 1.0}}, {"model": "e2", "parameters": {"weight": 0.4}}]
CONFIGS = {
    "base_flatten": {"base_model": "base", "models": W2},
    "no_base_flatten": {"models": W2},
    "base_rows": {"base_model": "base", "models": W2, "parameters": {"nuslerp_flatten": False}},
    "no_base_rows": {"models": W2, "parameters": {"nuslerp_flatten": False}},
    "base_row_wise": {"base_model": "base", "models": W2,
                      "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
    "no_base_row_wise_ignored_when_flat": {"models": W2, "parameters": {"nuslerp_row_wise": True}},
    "base_listed_weight_filters_gradient": {
        "base_model": "base",
        "models": [{"model": "base"},
                   {"model": "e0", "parameters": {"weight": [{"filter": "mlp", "value": [0.2, 1.0]},
                                                             {"value": 1.0}]}},
                   {"model": "e1"}],
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True,
                       "weight": [{"filter": "self_attn", "value": 2.0}, {"value": 0.6}]}},
}


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_end_to_end_parity_with_mergekit(name, llamas, tmp_path):
    p = parity_module()
    config = p._resolve({"merge_method": "nuslerp", **CONFIGS[name]}, llamas)
    ours, ref = run_both(config, tmp_path)
    assert_parity(ours, ref, name)
    shutil.rmtree(tmp_path, ignore_errors=True)
