"""DPPA (spec §7): the §11.7 vectors (pure helpers and the statistics protocol), DPA, engine runs."""

from __future__ import annotations

import pytest
import torch

from lightning_merge import ConfigError, get_method
from lightning_merge.engine import build_plan, compute_statistics, load_inputs, run_plan
from lightning_merge.errors import MergeError
from lightning_merge.methods.base import TensorInputs
from lightning_merge.methods.dppa import (
    DPPA,
    block_key,
    dp_offsets,
    dpa_amplify,
    is_prunable,
    layer_adjustments,
    matrix_adjustments,
    outlier_ratio,
    prune_mask,
)
from lightning_merge.sources import StateDictSource

NAMES = {  # §11.7's four matrices: blocks [[A, B], [C, D]]
    "A": "model.layers.0.self_attn.q_proj.weight",
    "B": "model.layers.0.self_attn.k_proj.weight",
    "C": "model.layers.1.self_attn.q_proj.weight",
    "D": "model.layers.1.self_attn.k_proj.weight",
}
LARGE = {"A": [3, 17], "B": [], "C": [1, 9, 22, 35], "D": [30]}


def make(large_pos) -> torch.Tensor:
    v = [(-1) ** i * (0.01 + 0.0001 * i) for i in range(40)]
    for j in large_pos:
        v[j] = 0.2 + 0.001 * j
    return torch.tensor(v, dtype=torch.float64).to(torch.float32).view(4, 10)


@pytest.fixture(scope="module")
def mats():
    return {k: make(v) for k, v in LARGE.items()}


def _offsets(mats):
    cat = lambda *xs: torch.cat([x.abs().flatten() for x in xs])  # noqa: E731
    block_ratios = {0: outlier_ratio(cat(mats["A"], mats["B"]), 3),
                    1: outlier_ratio(cat(mats["C"], mats["D"]), 3)}
    matrix_ratios = {k: outlier_ratio(mats[k].abs(), 5) for k in "ABCD"}
    return block_ratios, matrix_ratios, dp_offsets(
        block_ratios, matrix_ratios, {k: 40 for k in "ABCD"}, {"A": 0, "B": 0, "C": 1, "D": 1}, 0.08
    )


# ------------------------------------------------------------------------------------- §11.7 numbers

@pytest.mark.parametrize("s", ["0.8", "0.9"])
def test_dp_vectors(vectors, mats, s):
    v = vectors["dppa_dp"][s]
    density = 1 - float(s)
    block_ratios, matrix_ratios, (o, off) = _offsets(mats)
    assert [block_ratios[0], block_ratios[1]] == pytest.approx(v["layer_outlier_ratio_raw"])
    assert [matrix_ratios[k] for k in "ABCD"] == pytest.approx(v["matrix_outlier_ratio_raw"])
    assert [o[0], o[1]] == pytest.approx(v["layer_adjust"], abs=1e-12)
    assert [density + o[0], density + o[1]] == pytest.approx(v["layer_density"], abs=1e-12)
    dens = [density + off[k] for k in "ABCD"]
    assert dens == pytest.approx(v["matrix_density"], abs=1e-12)
    kept = [int(prune_mask(mats[k], d).sum()) for k, d in zip("ABCD", dens, strict=True)]
    assert kept == v["kept_counts"]
    # exact-k keeps n − ⌊n·s⌋ (one more than the reference threshold when |δ| are distinct)
    exact = [int(prune_mask(mats[k], d, compat=False).sum()) for k, d in zip("ABCD", dens, strict=True)]
    assert exact == [c + 1 if d > 0 else 0 for c, d in zip(v["kept_counts"], dens, strict=True)]


def test_adjustment_helpers():
    assert layer_adjustments([2.5, 6.25], 0.08) == pytest.approx([-0.08, 0.08])
    assert layer_adjustments([3.0, 3.0], 0.08) == [0.0, 0.0]  # the reference divides by 0 here
    a = matrix_adjustments([5, 0, 10, 2.5], [40] * 4, 0.08)
    assert a == pytest.approx([0.0088888889, -0.0622222222, 0.08, -0.0266666667])
    assert matrix_adjustments([0, 0], [4, 8], 0.08) == [0.0, 0.0]
    assert outlier_ratio(torch.zeros(10), 3) == 0.0


def test_dpa_matrix_c(vectors, mats):
    v = vectors["dppa_dpa_matrixC"]
    _, _, (_, off) = _offsets(mats)
    c = mats["C"]
    top = prune_mask(c, 0.1 + off["C"])
    low = prune_mask(c, 0.2 + off["C"])
    assert torch.nonzero(low.flatten()).flatten().tolist() == v["nonzero_idx_S0.8"]
    assert torch.nonzero(top.flatten()).flatten().tolist() == v["nonzero_idx_S0.9"]
    assert torch.nonzero((low & ~top).flatten()).flatten().tolist() == v["band_idx"]
    for band_mask in (low, low & ~top):  # band given as the S_lo set or as the band only
        amp = dpa_amplify(c, top, band_mask, v["alpha9"], v["alpha8"]).flatten()
        nz = torch.nonzero(amp).flatten().tolist()
        assert nz == sorted(int(k) for k in v["amplified_nonzero"])
        expect = [v["amplified_nonzero"][str(i)] for i in nz]
        assert [float(amp[i]) for i in nz] == pytest.approx(expect, rel=1e-6)
        assert float(amp.sum()) == pytest.approx(v["sum_amplified"], rel=1e-6)
        assert float(amp.sum()) == pytest.approx(1.56062, rel=1e-6)
    # α_lo = 0: the band vanishes
    amp0 = dpa_amplify(c, top, low, 1.8, 0.0).flatten()
    assert torch.nonzero(amp0).flatten().tolist() == vectors["dppa_dpa_matrixC_alpha8_0_nonzero_idx"]
    # α_lo = 2.0 > α_hi = 1.8: every kept entry × 2.0
    amp2 = dpa_amplify(c, top, low, 1.8, 2.0).flatten()
    expect = vectors["dppa_dpa_matrixC_alpha8_2.0_alpha9_1.8"]
    assert torch.nonzero(amp2).flatten().tolist() == sorted(int(k) for k in expect)
    assert [float(amp2[int(i)]) for i in expect] == pytest.approx(list(expect.values()), rel=1e-6)
    with pytest.raises(ConfigError, match="alpha"):
        dpa_amplify(c, top, low, -1.0, 0.0)


def test_statistics_protocol_reproduces_vectors(vectors, mats):
    """One expert holding A..D: the two statistics passes give §11.7's ratios and densities."""
    m = DPPA(density_top=0.1, density_band=0.2)
    stats = m.init_statistics()
    for p in range(2):
        for k in "DCBA":  # any order
            m.observe(stats, p, TensorInputs(NAMES[k], None, [mats[k]], [0], [1.0]))
        stats = m.finish_pass(stats, p)
    st = stats["experts"][0]
    assert [st.block_ratio[("model.layers", i)] for i in (0, 1)] == pytest.approx([2.5, 6.25])
    assert [st.matrix_ratio[NAMES[k]] for k in "ABCD"] == pytest.approx([5, 0, 10, 2.5])
    dens = DPPA.matrix_densities(stats, clamp=False)
    for s, idx in (("0.9", 0), ("0.8", 1)):
        got = [dens[NAMES[k]][0][idx] for k in "ABCD"]
        assert got == pytest.approx(vectors["dppa_dp"][s]["matrix_density"], abs=1e-12)
    assert DPPA.matrix_densities(stats)[NAMES["B"]][0][0] == 0.0  # clamped
    inputs = TensorInputs(NAMES["C"], torch.zeros(4, 10), [mats["C"]], [0], [1.0], stats=stats)
    amp = DPPA(alpha_top=1.8, alpha_band=1.0).amplified(inputs)[0]
    assert float(amp.sum()) == pytest.approx(1.56062, rel=1e-6)


# ---------------------------------------------------------------------------------- through the engine

def _dppa_model(scale: float = 1.0) -> dict[str, torch.Tensor]:
    sd = {NAMES[k]: make(LARGE[k]) * scale for k in "ABCD"}
    sd["model.embed_tokens.weight"] = torch.full((6, 10), 0.5) * scale
    sd["model.layers.0.input_layernorm.weight"] = torch.full((10,), 0.25) * scale
    return sd


def test_engine_single_expert_matches_vectors(vectors, mats):
    base_sd = {k: torch.zeros_like(v) for k, v in _dppa_model().items()}
    base, expert = StateDictSource(base_sd, label="base"), StateDictSource(_dppa_model(), label="e0")
    plan = build_plan(base, [expert], DPPA(alpha_top=1.8, alpha_band=1.0))
    out = dict(run_plan(plan))
    c = out[NAMES["C"]].flatten()
    expect = vectors["dppa_dpa_matrixC"]["amplified_nonzero"]
    assert torch.nonzero(c).flatten().tolist() == sorted(int(k) for k in expect)
    assert float(c.sum()) == pytest.approx(1.56062, rel=1e-6)
    counts = [int((out[NAMES[k]] != 0).sum()) for k in "ABCD"]
    assert counts == vectors["dppa_dp"]["0.8"]["kept_counts"]
    # unpruned tensors are amplified by max(α) = 1.8 (amplify_unpruned=True) or kept as they are
    assert torch.allclose(out["model.embed_tokens.weight"], torch.full((6, 10), 0.9))
    out2 = dict(run_plan(build_plan(base, [expert], DPPA(amplify_unpruned=False))))
    assert torch.equal(out2["model.layers.0.input_layernorm.weight"], torch.full((10,), 0.25))


def _random_sources(zero: bool = False):
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (32, 16), "lm_head.weight": (32, 16)}
    for i in range(3):
        for mod, shp in (("self_attn.q_proj", (16, 16)), ("self_attn.v_proj", (8, 16)),
                         ("mlp.down_proj", (16, 24))):
            shapes[f"model.layers.{i}.{mod}.weight"] = shp
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (16,)
    base = {k: torch.randn(*s, generator=g) for k, s in shapes.items()}
    experts = []
    for t in range(3):
        d = {k: (torch.zeros(*s) if zero else torch.randn(*s, generator=g) ** 3 * 0.01 * (t + 1))
             for k, s in shapes.items()}
        experts.append(StateDictSource({k: base[k] + d[k] for k in shapes}, label=f"e{t}"))
    return StateDictSource(base, label="base"), experts


@pytest.mark.parametrize("params", [{}, {"combination": "ties", "dppa_compat": False, "alpha_band": 0.5,
                                         "alpha_top": [1.0, 1.5, 2.0]}])
def test_engine_end_to_end(params):
    base, experts = _random_sources()
    method = DPPA(**params)
    plan = build_plan(base, experts, method, seed=1)
    out = dict(run_plan(plan))
    assert list(out) == base.keys()
    for k, v in out.items():
        assert v.shape == base.get(k).shape and bool(torch.isfinite(v).all())
    # DPPA is deterministic: any seed and any tensor order give the same result
    plan_rev = build_plan(base, experts, method, seed=7)
    plan_rev.tasks.reverse()
    rev = dict(run_plan(plan_rev))
    for k in out:
        assert torch.equal(out[k], rev[k])
    dens = DPPA.matrix_densities(plan.stats)
    assert len(dens) == 9 and all(set(v) == {0, 1, 2} for v in dens.values())
    assert all(0.0 <= t <= b <= 1.0 for v in dens.values() for t, b in v.values())
    # the densities move by at most 2Λ around the targets
    assert all(abs(b - 0.2) <= 0.16 + 1e-12 for v in dens.values() for _, b in v.values())
    # kept fraction of each prunable delta is about density_band
    q = "model.layers.1.self_attn.q_proj.weight"
    delta = (out[q] - base.get(q))
    assert 0 < int((delta != 0).sum()) <= delta.numel()


def test_engine_zero_deltas_give_base():
    base, experts = _random_sources(zero=True)
    for params in ({}, {"combination": "ties", "dppa_compat": False}):
        out = dict(run_plan(build_plan(base, experts, DPPA(**params))))
        for k, v in out.items():
            assert torch.equal(v, base.get(k))


def test_sharded_statistics_equal_single_pass():
    base, experts = _random_sources()
    method = DPPA()
    plan = build_plan(base, experts, method)
    whole = compute_statistics(plan)
    tasks = [t for t in plan.tasks if t.action == "merge"]
    stats = method.init_statistics()
    for p in range(2):
        parts = []
        for share in (tasks[1::2], tasks[::2]):
            st = {k: (dict(v) if isinstance(v, dict) else v) for k, v in stats.items()}
            st["records"] = {n: {e: dict(r) for e, r in recs.items()} for n, recs in stats["records"].items()}
            for task in share:
                method.observe(st, p, load_inputs(plan, task))
            parts.append(st)
        stats = method.finish_pass(method.combine_statistics(parts, p), p)
    assert DPPA.matrix_densities(stats) == DPPA.matrix_densities(whole)


def test_prunable_set():
    assert is_prunable("model.layers.3.mlp.gate_proj.weight", 2)
    assert is_prunable("transformer.h.0.attn.c_attn.weight", 2)
    assert is_prunable("bert.encoder.layer.2.attention.self.query.weight", 2)
    assert block_key("transformer.h.11.mlp.c_fc.weight") == ("transformer.h", 11)
    for name, ndim in (("model.embed_tokens.weight", 2), ("lm_head.weight", 2), ("model.norm.weight", 1),
                       ("model.layers.0.input_layernorm.weight", 1),
                       ("model.layers.0.self_attn.q_proj.bias", 1)):
        assert not is_prunable(name, ndim)


def test_missing_statistics_is_an_error(mats):
    with pytest.raises(MergeError, match="statistics"):
        DPPA().merge(TensorInputs(NAMES["A"], torch.zeros(4, 10), [mats["A"]], [0], [1.0]))


@pytest.mark.parametrize(
    "params, pname",
    [
        ({"density_top": 1.5}, "density_top"),
        ({"density_band": -0.1}, "density_band"),
        ({"density_top": 0.3, "density_band": 0.2}, "density_top"),
        ({"density_adjust": -0.01}, "density_adjust"),
        ({"layer_outlier_multiple": 0.0}, "layer_outlier_multiple"),
        ({"matrix_outlier_multiple": float("nan")}, "matrix_outlier_multiple"),
        ({"alpha_top": -1.0}, "alpha_top"),
        ({"alpha_band": [0.0, -0.5]}, "alpha_band"),
        ({"combination": "mean"}, "combination"),
        ({"zero_sign": "negative"}, "zero_sign"),
        ({"lambda_": float("nan")}, "lambda_"),
    ],
)
def test_bad_hyperparameters(params, pname):
    with pytest.raises(ConfigError, match=pname):
        DPPA(**params)


def test_registered_and_weights():
    m = get_method("dppa", alpha_top=2.0, **{"lambda": 0.5})
    assert isinstance(m, DPPA) and m.lambda_ == 0.5 and m.allow_negative_weights
    assert not DPPA(combination="ties").allow_negative_weights
    with pytest.raises(ConfigError, match="alpha_top"):
        DPPA(alpha_top=[1.0, 2.0]).check_experts(3)
