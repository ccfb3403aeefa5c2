"""Adaptive-RMS (spec §6): the §11.6 vectors, the slide CV check, drop statistics, engine runs."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_merge import ConfigError, get_method
from lightning_merge.engine import build_plan, compute_statistics, load_inputs, run_plan
from lightning_merge.errors import MergeError
from lightning_merge.methods.adaptive_rms import (
    AdaptiveRMS,
    AdaptiveRMSStatistics,
    cv_percent,
    merge_with_masks,
    rms_of,
    role_drop_rates,
    tensor_role,
)
from lightning_merge.methods.base import TensorInputs
from lightning_merge.naming import layer_of
from lightning_merge.sources import StateDictSource

Q = "model.layers.{}.self_attn.q_proj.weight"


@pytest.fixture
def layers(tau_inputs):
    """§11.6: m1 = (τ1, 0.5τ2), m2 = (τ2, τ3), m3 = (τ3, 2τ1), as 2×3 matrices; [expert][layer]."""
    _, (t1, t2, t3) = tau_inputs
    mats = [(t1, 0.5 * t2), (t2, t3), (t3, 2 * t1)]
    return [[m.view(2, 3) for m in pair] for pair in mats]


def _rms_table(layers, scale_m1: float = 1.0):
    return {
        f"L{k}": {t: rms_of(layers[t][k] * (scale_m1 if t == 0 else 1.0)) for t in range(3)} for k in range(2)
    }


def _as_matrix(drop):
    return [[drop[f"L{k}"][t] for k in range(2)] for t in range(3)]


def _stats_via_method(method: AdaptiveRMS, layers, scale_m1: float = 1.0, order=(0, 1)):
    """Run the method's statistics protocol on the §11.6 data (tensor order ``order``)."""
    stats = method.init_statistics()
    for k in order:
        tensors = [layers[t][k] * (scale_m1 if t == 0 else 1.0) for t in range(3)]
        method.observe(stats, 0, TensorInputs(Q.format(k), None, tensors, [0, 1, 2], [1.0] * 3))
    return method.finish_pass(stats, 0)


# ------------------------------------------------------------------------------------- §11.6 numbers

def test_low_cv_statistics(vectors, layers):
    v = vectors["adaptive_rms_low_cv"]
    table = _rms_table(layers)
    for t in range(3):
        for k in range(2):
            assert table[f"L{k}"][t] == pytest.approx(v["rms"][t][k], rel=1e-6)
    drop, summary = role_drop_rates(table, drop_rate=0.7, drop_scale=0.5)
    assert [summary.per_model_mean[t] for t in range(3)] == pytest.approx(v["per_model_mean"], rel=1e-6)
    assert summary.global_mean == pytest.approx(v["global_mean"], rel=1e-6)
    assert summary.cv_percent == pytest.approx(v["cv_percent"], rel=1e-6)
    assert summary.cv_percent == pytest.approx(33.6482161, abs=1e-5)
    assert summary.branch == v["branch"] == "global"
    assert _as_matrix(drop) == [pytest.approx(r, rel=1e-6) for r in v["drop_rates"]]


def test_high_cv_statistics(vectors, layers):
    v = vectors["adaptive_rms_high_cv"]
    table = _rms_table(layers, scale_m1=8.0)
    assert [table["L0"][0], table["L1"][0]] == pytest.approx(v["rms"][0], rel=1e-6)
    drop, summary = role_drop_rates(table, drop_rate=0.7, drop_scale=v["lambda"])
    assert [summary.per_model_mean[t] for t in range(3)] == pytest.approx(v["per_model_mean"], rel=1e-6)
    assert summary.global_mean == pytest.approx(v["global_mean"], rel=1e-6)
    assert summary.cv_percent == pytest.approx(v["cv_percent"], rel=1e-6)
    assert summary.branch == "per_model"
    assert _as_matrix(drop) == [pytest.approx(r, rel=1e-6) for r in v["drop_rates"]]
    # the global branch (forced by a threshold above the CV) penalises models 2 and 3
    drop_g, summary_g = role_drop_rates(table, drop_rate=0.7, drop_scale=0.2, cv_threshold=100.0)
    assert summary_g.branch == "global"
    assert _as_matrix(drop_g) == [pytest.approx(r, rel=1e-6) for r in v["drop_rates_if_global_branch"]]


def test_statistics_through_the_method_protocol(vectors, layers):
    """observe/finish_pass give the §11.6 numbers, in either tensor order."""
    for scale, lam, key in ((1.0, 0.5, "adaptive_rms_low_cv"), (8.0, 0.2, "adaptive_rms_high_cv")):
        m = AdaptiveRMS(drop_rate=0.7, drop_scale=lam)
        for order in ((0, 1), (1, 0)):
            st = _stats_via_method(m, layers, scale, order)
            assert isinstance(st, AdaptiveRMSStatistics)
            (summary,) = st.summaries.values()
            assert summary.role == "model.layers.*.self_attn.q_proj"
            assert summary.tensors == [Q.format(0), Q.format(1)]
            assert summary.cv_percent == pytest.approx(vectors[key]["cv_percent"], rel=1e-6)
            rates = AdaptiveRMS.drop_rates(st)
            got = [[rates[Q.format(k)][t] for k in range(2)] for t in range(3)]
            assert got == [pytest.approx(r, rel=1e-6) for r in vectors[key]["drop_rates"]]


def test_slide_cv_check(vectors):
    v = vectors["seed001_cv_check"]
    vals = [8.499e-4, 1.243e-4, 1.296e-4]
    assert math.fsum(vals) / 3 == pytest.approx(v["mean"], rel=1e-9)
    assert cv_percent(vals) == pytest.approx(v["cv_percent"], rel=1e-9)
    assert cv_percent(vals) == pytest.approx(113.4455, abs=5e-5)
    # CV edge cases (spec §6.2 (3), §9.5): T = 1 or mean 0 -> 0
    assert cv_percent([0.3]) == 0.0
    assert cv_percent([0.0, 0.0, 0.0]) == 0.0


def test_fixed_mask_merge(vectors, layers):
    v = vectors["adaptive_rms_low_cv"]
    masks = {
        0: [[1, 0, 1, 1, 0, 0], [0, 1, 1, 0, 1, 1], [1, 1, 0, 0, 0, 1]],
        1: [[0, 1, 1, 0, 1, 0], [1, 0, 0, 1, 1, 0], [1, 1, 0, 0, 0, 1]],
    }
    drop = v["drop_rates"]
    for k, lv in enumerate(v["layers"]):
        deltas = [layers[t][k] for t in range(3)]
        keep = [torch.tensor(m, dtype=torch.bool).view(2, 3) for m in masks[k]]
        p = [drop[t][k] for t in range(3)]
        out = merge_with_masks(deltas, keep, p)
        assert out.shape == (2, 3)
        assert out.flatten().tolist() == pytest.approx(sum(lv["merged_delta"], []), rel=1e-6)
        assert (out * (1 - min(p))).flatten().tolist() == pytest.approx(lv["disjoint_mean"], rel=1e-6)
        assert 1 / (1 - min(p)) == pytest.approx(lv["rescale"], rel=1e-9)
        assert min(p) == pytest.approx(lv["min_drop"], rel=1e-9)
        assert torch.sign(out).flatten().tolist() == [
            s if d != 0 else 0.0 for s, d in zip(lv["elected_sign"], lv["disjoint_mean"], strict=True)
        ]
    # min p = 1: Δ* = 0, never NaN
    z = merge_with_masks([layers[0][0]], [torch.ones(2, 3, dtype=torch.bool)], [1.0])
    assert torch.equal(z, torch.zeros(2, 3))


# ------------------------------------------------------------------------------------------ drop

def _inputs_with_stats(method, deltas, seed=0):
    inputs = TensorInputs(Q.format(0), torch.zeros_like(deltas[0]), deltas, list(range(len(deltas))),
                          [1.0] * len(deltas), seed=seed)
    st = method.init_statistics()
    method.observe(st, 0, inputs)
    inputs.stats = method.finish_pass(st, 0)
    return inputs


def test_kept_fraction_matches_drop_rate():
    """Bernoulli(1 − p) keep masks: the kept fraction of each matrix is within 5σ of 1 − p,
    σ = sqrt(p(1 − p)/(n·N)) over N seeds of an n-entry matrix."""
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(128, 128, generator=g) * s for s in (1.0, 2.0, 0.5)]
    # one matrix per role: force the global branch so that the experts' rates differ
    m = AdaptiveRMS(drop_rate=0.7, drop_scale=0.1, cv_threshold=1e6)
    n, seeds = deltas[0].numel(), 6
    kept = [0, 0, 0]
    for seed in range(seeds):
        inputs = _inputs_with_stats(m, deltas, seed)
        p = m.tensor_drop_rates(inputs)
        for i, mask in enumerate(m.keep_masks(inputs, p)):
            kept[i] += int(mask.sum())
    assert len(set(p)) == 3  # the three experts really have different drop rates
    for i in range(3):
        sigma = math.sqrt(p[i] * (1 - p[i]) / (n * seeds))
        assert abs(kept[i] / (n * seeds) - (1 - p[i])) < 5 * sigma
    # the magnitude ("other drop version") keeps exactly ⌊(1 − p)·n⌋ largest entries
    mm = AdaptiveRMS(drop_rate=0.7, drop_scale=0.1, drop_mode="magnitude")
    inputs = _inputs_with_stats(mm, deltas)
    for d, p_i, mask in zip(deltas, p, mm.keep_masks(inputs, p), strict=True):
        k = int((1 - p_i) * n)
        assert int(mask.sum()) == k
        assert float(d.abs()[mask].min()) >= float(d.abs()[~mask].max())


def test_clipping_and_extremes():
    table = {"L0": {0: 10.0, 1: 0.0}, "L1": {0: 0.0, 1: 10.0}}
    drop, _ = role_drop_rates(table, drop_rate=0.9, drop_scale=1.0, p_max=0.95)
    assert all(0.0 <= p <= 0.95 for d in drop.values() for p in d.values())
    assert drop["L0"][0] == 0.0 and drop["L0"][1] == 0.95
    # all-zero deltas: rms 0, CV 0, p = p_default, merged delta 0
    m = AdaptiveRMS(drop_rate=0.5, drop_scale=1.0)
    inputs = _inputs_with_stats(m, [torch.zeros(4, 4)] * 3)
    assert m.tensor_drop_rates(inputs) == [0.5] * 3
    assert torch.equal(m.merge(inputs), torch.zeros(4, 4))


def test_roles():
    assert layer_of("model.layers.12.mlp.up_proj.weight") == (
        "model.layers", 12, "mlp.up_proj.weight")
    assert layer_of("model.embed_tokens.weight") is None
    assert tensor_role(Q.format(3), 2) == ("model.layers.*.self_attn.q_proj", 3)
    assert tensor_role("transformer.h.1.attn.c_proj.weight", 2, "attn_ffn") == ("transformer.h.*.attn", 1)
    assert tensor_role("transformer.h.1.mlp.c_proj.weight", 2, "attn_ffn") == ("transformer.h.*.ffn", 1)
    bert = "encoder.layer.0.attention.self.value.weight"
    assert tensor_role(bert, 2, "attn_ffn")[0] == "encoder.layer.*.attn"
    assert tensor_role("encoder.layer.0.output.dense.weight", 2, "attn_ffn")[0] == "encoder.layer.*.ffn"
    assert tensor_role("model.layers.0.mixer.in_x.weight", 2, "attn_ffn")[0] == "model.layers.*.mixer.in_x"
    for name, ndim in (("model.embed_tokens.weight", 2), ("lm_head.weight", 2),
                       ("model.layers.0.input_layernorm.weight", 1),
                       ("model.layers.0.self_attn.q_proj.bias", 1)):
        assert tensor_role(name, ndim) is None


@pytest.mark.parametrize(
    "params, pname",
    [
        ({"drop_rate": 1.5}, "drop_rate"),
        ({"drop_rate": -0.1}, "drop_rate"),
        ({"drop_scale": -1.0}, "drop_scale"),
        ({"drop_scale": float("nan")}, "drop_scale"),
        ({"rms_denominator": "dim"}, "rms_denominator"),
        ({"rms_unit_scale": 0.0}, "rms_unit_scale"),
        ({"cv_threshold": -5.0}, "cv_threshold"),
        ({"cv_scope": "layer"}, "cv_scope"),
        ({"roles": "qv"}, "roles"),
        ({"p_max": 1.2}, "p_max"),
        ({"non_role": "skip"}, "non_role"),
        ({"drop_mode": "topk"}, "drop_mode"),
        ({"lambda_": float("inf")}, "lambda_"),
    ],
)
def test_bad_hyperparameters(params, pname):
    with pytest.raises(ConfigError, match=pname):
        AdaptiveRMS(**params)


def test_registered_and_per_expert_length():
    m = get_method("adaptive-rms", drop_rate=[0.5, 0.9], **{"lambda": 0.5})
    assert isinstance(m, AdaptiveRMS) and m.lambda_ == 0.5
    with pytest.raises(ConfigError, match="drop_rate"):
        m.check_experts(3)


# ---------------------------------------------------------------------------------- through the engine

def _model(seed: int, scale: float, zero: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.zeros(shape) if zero else torch.randn(*shape, generator=g) * scale

    sd = {"model.embed_tokens.weight": r(16, 8)}
    for i in range(3):
        for mod in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj"):
            sd[f"model.layers.{i}.{mod}.weight"] = r(8, 8)
        sd[f"model.layers.{i}.input_layernorm.weight"] = r(8)
    sd["lm_head.weight"] = r(16, 8)
    return sd


def _sources(zero: bool = False):
    base = _model(0, 1.0)
    experts = []
    for t, s in enumerate((0.01, 0.03, 0.02)):
        d = _model(10 + t, s, zero)
        experts.append(StateDictSource({k: base[k] + d[k] for k in base}, label=f"expert{t}"))
    return StateDictSource(base, label="base"), experts


@pytest.mark.parametrize("params", [{}, {"drop_mode": "magnitude", "roles": "attn_ffn", "cv_scope": "global",
                                         "non_role": "ties_nodrop"}])
def test_engine_end_to_end(params):
    base, experts = _sources()
    method = AdaptiveRMS(drop_rate=0.7, drop_scale=20.0, **params)
    out = dict(run_plan(build_plan(base, experts, method, seed=3)))
    assert list(out) == base.keys()
    for k, v in out.items():
        assert v.shape == base.get(k).shape and v.dtype == torch.float32
        assert bool(torch.isfinite(v).all())
        assert not torch.equal(v, base.get(k))  # every tensor moved
    # same seed -> identical; reversed tensor order -> identical
    again = dict(run_plan(build_plan(base, experts, method, seed=3)))
    plan_rev = build_plan(base, experts, method, seed=3)
    plan_rev.tasks.reverse()
    rev = dict(run_plan(plan_rev))
    for k in out:
        assert torch.equal(out[k], again[k]) and torch.equal(out[k], rev[k])
    # diagnostics: one list of drop rates per role tensor, one entry per expert
    stats = compute_statistics(build_plan(base, experts, method, seed=3))
    rates = AdaptiveRMS.drop_rates(stats)
    assert len(rates) == 9 and all(len(v) == 3 and all(0 <= p <= 0.99 for p in v) for v in rates.values())
    if not params:
        assert len(stats.summaries) == 3
        other = dict(run_plan(build_plan(base, experts, method, seed=4)))
        assert any(not torch.equal(out[k], other[k]) for k in out)
    else:
        assert set(stats.summaries) == {"model.layers.*.attn", "model.layers.*.ffn"}


def test_engine_zero_deltas_give_base():
    base, experts = _sources(zero=True)
    out = dict(run_plan(build_plan(base, experts, AdaptiveRMS(drop_rate=0.9, drop_scale=5.0))))
    for k, v in out.items():
        assert torch.equal(v, base.get(k))


def test_sharded_statistics_equal_single_pass():
    """combine_statistics of two workers' shares equals one pass over every tensor."""
    base, experts = _sources()
    method = AdaptiveRMS(drop_rate=0.7, drop_scale=20.0)
    plan = build_plan(base, experts, method)
    whole = compute_statistics(plan)
    tasks = [t for t in plan.tasks if t.action == "merge"]
    parts = []
    for share in (tasks[::2], tasks[1::2]):
        st = method.init_statistics()
        for task in share:
            method.observe(st, 0, load_inputs(plan, task))
        parts.append(st)
    sharded = method.finish_pass(method.combine_statistics(parts, 0), 0)
    assert sharded.drop == whole.drop and sharded.rms == whole.rms


def test_missing_statistics_is_an_error():
    m = AdaptiveRMS()
    d = [torch.ones(2, 2)]
    with pytest.raises(MergeError, match="statistics"):
        m.merge(TensorInputs(Q.format(0), torch.zeros(2, 2), d, [0], [1.0]))
