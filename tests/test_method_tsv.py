"""``tsv_m`` (TSV-M, Task Singular Vectors Merge): hand-worked cases, edge cases, validation, YAML,
an independent float64 reference, and parity with FusionBench 0.2.33's
``compute_and_sum_svd_mem_reduction`` (skipped without the wheel; see tests/svd_helpers.py).

Tolerances: hand-worked values and the float64 reference to 1e-5 · max(1, max |Δ|) (float32 SVDs
of well-conditioned matrices); FusionBench to the same (it runs the same float32 SVDs, with the
zero-padded bases and a different multiplication order).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from svd_helpers import TSV, make_llamas, reference, run_merge_cli

from lightning_merge.engine import build_plan, run_plan
from lightning_merge.errors import ConfigError
from lightning_merge.mergekit import parse_config
from lightning_merge.methods import TSVM, TensorInputs, get_method
from lightning_merge.methods.tsv import tsv_rank
from lightning_merge.sources import StateDictSource

KEY = "model.layers.0.mlp.up_proj.weight"
TOL = 1e-5


def merge(base, deltas, weights=None, key=KEY, **params):
    """Through the engine: experts are θ₀ + δ_t."""
    b = StateDictSource({key: base}, "base")
    es = [StateDictSource({key: base + d}, f"e{i}") for i, d in enumerate(deltas)]
    return dict(run_plan(build_plan(b, es, TSVM(**params), weights=weights)))[key]


def close(got, want, tol=TOL):
    scale = max(1.0, float(want.abs().max()))
    err = float((got.double() - want.double()).abs().max())
    assert got.shape == want.shape and err <= tol * scale, f"differs by {err:.3g}"


def polar64(a):
    u, _, vh = torch.linalg.svd(a.double(), full_matrices=False)
    return u @ vh


def tsv_reference(deltas, weights=None, rank_fraction=None):
    """The paper's TSV-M in float64, with the reference code's zero-padded r-column bases."""
    ds = [d.double() * (1.0 if weights is None else weights[i]) for i, d in enumerate(deltas)]
    if ds[0].dim() != 2:
        return sum(ds) / len(ds)
    m, n = ds[0].shape
    r, T = min(m, n), len(ds)
    k = r // T if rank_fraction is None else int(r * rank_fraction)
    f64 = torch.float64
    U, S, V = torch.zeros(m, r, dtype=f64), torch.zeros(r, dtype=f64), torch.zeros(r, n, dtype=f64)
    for t, d in enumerate(ds):
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        U[:, t * k:(t + 1) * k], S[t * k:(t + 1) * k], V[t * k:(t + 1) * k] = u[:, :k], s[:k], vh[:k]
    return polar64(U) @ torch.diag(S) @ polar64(V)


def rnd(shape, n, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), [torch.randn(shape, generator=g) * scale for _ in range(n)]


# ------------------------------------------------------------------------------------------ hand-worked

def test_two_rank_one_tasks_are_orthogonalised_symmetrically():
    """δ₁ = 3 e₁e₁ᵀ, δ₂ = 2 a bᵀ with a, b at angles φ, ψ from e₁; k = 1. The polar factor of two
    unit vectors at angle φ turns them to ±45° around their bisector (Löwdin), so
    Δ = 3 p₁q₁ᵀ + 2 p₂q₂ᵀ with p at angles φ/2 ∓ π/4 and q at ψ/2 ∓ π/4."""
    phi, psi = math.pi / 3, math.pi / 6
    e1 = torch.tensor([1.0, 0.0])

    def unit(x):
        return torch.tensor([math.cos(x), math.sin(x)])

    d1, d2 = 3 * torch.outer(e1, e1), 2 * torch.outer(unit(phi), unit(psi))
    want = (3 * torch.outer(unit(phi / 2 - math.pi / 4), unit(psi / 2 - math.pi / 4))
            + 2 * torch.outer(unit(phi / 2 + math.pi / 4), unit(psi / 2 + math.pi / 4)))
    base = torch.zeros(2, 2)
    close(merge(base, [d1, d2]), want)
    close(merge(base, [d1, d2], lambda_=0.5), 0.5 * want)


def test_orthogonal_supports_equal_task_arithmetic():
    """Tasks on disjoint row and column blocks, each of rank ≤ k = 6 // 2: θ₀ + λ Σ w δ."""
    base, _ = rnd((6, 6), 0)
    g = torch.Generator().manual_seed(3)
    d1, d2 = torch.zeros(6, 6), torch.zeros(6, 6)
    d1[:3, :3] = torch.randn(3, 3, generator=g)
    d2[3:, 3:] = torch.randn(3, 3, generator=g)
    got = merge(base, [d1, d2], weights=[1.0, 0.5], lambda_=1.3)
    close(got, base + 1.3 * (d1 + 0.5 * d2))
    ta = get_method("task_arithmetic", lambda_=1.3)
    b = StateDictSource({KEY: base}, "base")
    es = [StateDictSource({KEY: base + d}, f"e{i}") for i, d in enumerate([d1, d2])]
    close(got, dict(run_plan(build_plan(b, es, ta, weights=[1.0, 0.5])))[KEY])


@pytest.mark.parametrize("shape", [(5, 7), (7, 5), (4, 4), (1, 6)])
def test_one_expert_at_full_fraction_is_the_expert_up_to_lambda(shape):
    base, (d,) = rnd(shape, 1)
    close(merge(base, [d]), base + d)
    close(merge(base, [d], lambda_=0.7, rank_fraction=1.0), base + 0.7 * d)


def test_one_expert_with_a_fraction_is_its_best_low_rank_approximation():
    base, (d,) = rnd((6, 8), 1, seed=2)
    u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
    for f, k in ((0.5, 3), (0.34, 2), (0.2, 1)):
        close(merge(base, [d], rank_fraction=f) - base, (u[:, :k] * s[:k]) @ vh[:k])


def test_rank_per_task():
    assert [tsv_rank(r, 3, None) for r in (2, 3, 8, 9)] == [0, 1, 2, 3]
    assert tsv_rank(49, 49, None) == 1  # the reference's int(49 * (1 / 49)) is 0
    assert tsv_rank(10, 2, 0.25) == 2 and tsv_rank(10, 1, 1.0) == 10


# ------------------------------------------------------------------------------------------ edge cases

@pytest.mark.parametrize("shape,n", [((1, 5), 2), ((3, 2), 3), ((2, 9), 3)])
def test_matrices_of_rank_below_the_number_of_tasks_keep_nothing(shape, n):
    base, deltas = rnd(shape, n)
    assert torch.equal(merge(base, deltas), base)


@pytest.mark.parametrize("shape", [(7,), (2, 3, 4), ()])
def test_non_matrices_take_the_weighted_mean(shape):
    base, deltas = rnd(shape, 3, seed=4)
    w = [1.0, 0.5, -2.0]
    want = base + 0.8 * (deltas[0] + 0.5 * deltas[1] - 2.0 * deltas[2]) / 3
    close(merge(base, deltas, weights=w, key="model.norm.weight", lambda_=0.8), want, 1e-6)


def test_svd_false_takes_the_mean_of_a_matrix():
    base, deltas = rnd((5, 6), 2)
    close(merge(base, deltas, svd=False, lambda_=2.0), base + (deltas[0] + deltas[1]))


def test_zero_deltas_give_the_base_exactly():
    base, _ = rnd((4, 6), 0)
    assert torch.equal(merge(base, [torch.zeros(4, 6)] * 3), base)


def test_empty_matrix():
    base = torch.zeros(0, 4)
    assert merge(base, [torch.zeros(0, 4)] * 2).shape == (0, 4)


def test_deterministic_order_and_sign_independent():
    base, deltas = rnd((9, 12), 3, seed=5)
    a = merge(base, deltas, weights=[1.0, 0.5, 2.0])
    assert torch.equal(a, merge(base, deltas, weights=[1.0, 0.5, 2.0]))
    close(merge(base, deltas[::-1], weights=[2.0, 0.5, 1.0]), a)
    # −δ has the same singular vectors up to sign: the result is exactly −(result for δ)
    close(merge(base, [-d for d in deltas], weights=[1.0, 0.5, 2.0]) - base, -(a - base))


def test_bfloat16_model_keeps_its_dtype():
    base, deltas = rnd((6, 6), 2)
    b = StateDictSource({KEY: base.bfloat16()}, "base")
    es = [StateDictSource({KEY: (base + d).bfloat16()}, f"e{i}") for i, d in enumerate(deltas)]
    out = dict(run_plan(build_plan(b, es, TSVM())))[KEY]
    assert out.dtype == torch.bfloat16 and out.shape == (6, 6) and bool(torch.isfinite(out.float()).all())


def test_dependent_singular_vectors_are_reported(caplog):
    """Two rank-1 'LoRA-like' tasks on 4 × 4 keep k = 2 triplets each: one of each pair has σ = 0,
    with arbitrary singular vectors (the result depends on them, as in the reference)."""
    g = torch.Generator().manual_seed(6)
    deltas = [torch.outer(torch.randn(4, generator=g), torch.randn(4, generator=g)) for _ in range(2)]
    with caplog.at_level(logging.DEBUG, logger="lightning_merge.methods.svd"):
        merge(torch.zeros(4, 4), deltas)
    assert any("tsv_m" in r.message and "arbitrary" in r.message and KEY in r.message for r in caplog.records)


# ------------------------------------------------------------------------------------------ validation

@pytest.mark.parametrize("value", [0.0, -0.1, 1.5, float("nan"), "0.5", True])
def test_rank_fraction_is_validated(value):
    with pytest.raises(ConfigError, match="rank_fraction"):
        TSVM(rank_fraction=value)


def test_rank_fraction_must_fit_the_experts_before_anything_is_read():
    base, deltas = rnd((4, 4), 3)
    with pytest.raises(ConfigError, match=r"rank_fraction.*3 experts.*1/3"):
        merge(base, deltas, rank_fraction=0.5)
    with pytest.raises(ConfigError, match="rank_fraction"):  # a direct call checks too
        TSVM(rank_fraction=0.5).merge(TensorInputs(KEY, base, [d.clone() for d in deltas], [0, 1, 2], [1.0] * 3))
    merge(base, deltas, rank_fraction=1 / 3)  # fits


@pytest.mark.parametrize("params,name", [({"svd": "yes"}, "svd"), ({"lambda_": float("inf")}, "lambda_")])
def test_other_parameters_are_validated(params, name):
    with pytest.raises(ConfigError, match=name):
        TSVM(**params)


def test_needs_a_base():
    with pytest.raises(ConfigError, match="base"):
        TSVM().merge(TensorInputs(KEY, None, [torch.ones(2, 2)], [0], [1.0]))


# ------------------------------------------------------------------------------------------ YAML

def test_yaml_form():
    r = parse_config({"merge_method": "tsv_m", "base_model": "b",
                      "models": [{"model": "e0"}, {"model": "e1", "parameters": {"weight": 0.5}}],
                      "parameters": {"lambda": 1.5, "rank_fraction": 0.25}})
    assert r.method == TSVM(lambda_=1.5, rank_fraction=0.25) and r.weights == [1.0, 0.5]
    assert parse_config({"merge_method": "tsv-m", "base_model": "b", "models": [{"model": "e0"}]}).method == TSVM()
    with pytest.raises(ConfigError, match="common_space_fraction"):
        parse_config({"merge_method": "tsv_m", "base_model": "b", "models": [{"model": "e0"}],
                      "parameters": {"common_space_fraction": 0.5}})
    with pytest.raises(ConfigError, match="base_model"):
        parse_config({"merge_method": "tsv_m", "models": [{"model": "e0"}]})


# ------------------------------------------------------------------------------------------ references

@pytest.mark.parametrize("shape", [(6, 9), (9, 6), (8, 8), (16, 12)])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_matches_an_independent_float64_reference(shape, n):
    base, deltas = rnd(shape, n, seed=n)
    w = [1.0 + 0.5 * i for i in range(n)]
    close(merge(base, deltas, weights=w, lambda_=0.9) - base, 0.9 * tsv_reference(deltas, w).float())
    close(merge(base, deltas, rank_fraction=0.2) - base, tsv_reference(deltas, rank_fraction=0.2).float())


@pytest.mark.parametrize("shape", [(6, 9), (9, 6), (8, 8), (1, 5), (3, 2), (7,), (2, 3, 4)])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_parity_with_fusion_bench(shape, n):
    """FusionBench's ``compute_and_sum_svd_mem_reduction`` on the task vectors; its list ``alpha``
    (our weights) scales each task vector first, its float ``alpha`` (our λ) the result."""
    fb = reference(TSV, "compute_and_sum_svd_mem_reduction")
    base, deltas = rnd(shape, n, seed=10 + n)
    w = [1.0, 0.5, 1.5][:n]
    ref = fb([{"w": d * w[i]} for i, d in enumerate(deltas)], accelerator="cpu")["w"]
    close(merge(base, deltas, weights=w, lambda_=1.2) - base, 1.2 * ref)


# ------------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    return make_llamas(tmp_path_factory.mktemp("tsv_llamas"))


@pytest.fixture(scope="module")
def merged(llamas, tmp_path_factory):
    """``lightning-merge merge`` of a TSV-M YAML (the embeddings excluded by a filter)."""
    config = {"merge_method": "tsv_m", "base_model": str(llamas / "base"),
              "models": [{"model": str(llamas / f"e{i}")} for i in range(3)],
              "parameters": {"lambda": 0.8, "svd": [{"filter": "embed_tokens", "value": False}, {"value": True}]}}
    return run_merge_cli(config, tmp_path_factory.mktemp("tsv_out") / "merged")


def _task_vectors(llamas):
    from svd_helpers import load_folder

    base = load_folder(llamas / "base")
    return base, [{k: v - base[k] for k, v in load_folder(llamas / f"e{i}").items()} for i in range(3)]


def test_end_to_end_matches_the_float64_reference(llamas, merged):
    base, tvs = _task_vectors(llamas)
    assert set(merged) == set(base)
    for k, b in base.items():
        deltas = [tv[k] for tv in tvs]
        want = sum(d.double() for d in deltas) / 3 if "embed_tokens" in k else tsv_reference(deltas)
        close(merged[k] - b, 0.8 * want.float())
        assert merged[k].dtype == b.dtype


def test_end_to_end_parity_with_fusion_bench(llamas, merged):
    fb = reference(TSV, "compute_and_sum_svd_mem_reduction")
    base, tvs = _task_vectors(llamas)
    ref = fb(tvs, exclude_keys=["model.embed_tokens.weight"], accelerator="cpu")
    for k, b in base.items():
        close(merged[k] - b, 0.8 * ref[k])
