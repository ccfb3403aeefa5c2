"""``iso_c`` and ``iso_cts`` (isotropic merging): hand-worked cases, edge cases, validation, YAML, an
independent float64 reference, and parity with FusionBench 0.2.33's ``iso_c`` / ``iso_cts``
(skipped without the wheel; see tests/svd_helpers.py).

Tolerances: 1e-5 · max(1, max |Δ|) everywhere (float32 SVDs of well-conditioned matrices; the
references run the same float32 SVDs with another multiplication order).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from svd_helpers import ISO, load_folder, make_llamas, reference, run_merge_cli

from lightning_merge.engine import build_plan, run_plan
from lightning_merge.errors import ConfigError
from lightning_merge.mergekit import parse_config
from lightning_merge.methods import IsoC, IsoCTS, TensorInputs, get_method
from lightning_merge.methods.isotropic import iso_cts_dims
from lightning_merge.sources import StateDictSource

KEY = "model.layers.0.self_attn.o_proj.weight"
TOL = 1e-5


def merge(cls, base, deltas, weights=None, key=KEY, **params):
    """Through the engine: experts are θ₀ + δ_t."""
    b = StateDictSource({key: base}, "base")
    es = [StateDictSource({key: base + d}, f"e{i}") for i, d in enumerate(deltas)]
    return dict(run_plan(build_plan(b, es, cls(**params), weights=weights)))[key]


def close(got, want, tol=TOL):
    scale = max(1.0, float(want.abs().max()))
    err = float((got.double() - want.double()).abs().max())
    assert got.shape == want.shape and err <= tol * scale, f"differs by {err:.3g}"


def svd64(a):
    return torch.linalg.svd(a.double(), full_matrices=False)


def polar64(a):
    u, _, vh = svd64(a)
    return u @ vh


def iso_c_reference(deltas, weights=None):
    ds = [d.double() * (1.0 if weights is None else weights[i]) for i, d in enumerate(deltas)]
    if ds[0].dim() != 2:
        return sum(ds) / len(ds)
    u, s, vh = svd64(sum(ds))
    return s.mean() * u @ vh


def iso_cts_reference(deltas, f=0.8, weights=None):
    """Iso-CTS in float64, written from the paper's description with the reference's sizes."""
    ds = [d.double() * (1.0 if weights is None else weights[i]) for i, d in enumerate(deltas)]
    if ds[0].dim() != 2:
        return sum(ds) / len(ds)
    T, r = len(ds), min(ds[0].shape)
    c = int(r * f)
    c = r - round((r - c) / T) * T
    k = (r - c) // T
    u, s, vh = svd64(sum(ds))
    us, ss, vs = [u[:, :c]], [s[:c]], [vh[:c]]
    proj = torch.eye(ds[0].shape[0], dtype=torch.float64) - u[:, :c] @ u[:, :c].T
    for d in ds:
        ut, st, vt = svd64(proj @ d)
        us.append(ut[:, :k]), ss.append(st[:k]), vs.append(vt[:k])
    return torch.cat(ss).mean() * polar64(torch.cat(us, 1)) @ polar64(torch.cat(vs, 0))


def rnd(shape, n, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), [torch.randn(shape, generator=g) * scale for _ in range(n)]


def rot(a):
    return torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


# ------------------------------------------------------------------------------------------ hand-worked

def test_iso_c_of_one_expert_is_its_singular_vectors_with_a_flat_spectrum():
    """δ = R(30°) diag(5, 1) R(−70°): σ̄ = 3, Δ = 3 R(30°) R(−70°) = 3 R(−40°)."""
    d = rot(math.radians(30)) @ torch.diag(torch.tensor([5.0, 1.0])) @ rot(math.radians(-70))
    base = torch.zeros(2, 2)
    close(merge(IsoC, base, [d]), 3 * rot(math.radians(-40)))
    close(merge(IsoC, base, [d], lambda_=1.5), 4.5 * rot(math.radians(-40)))


def test_iso_c_of_two_experts_flattens_their_sum():
    base = torch.zeros(2, 2)
    d1, d2 = torch.diag(torch.tensor([2.0, 0.0])), torch.diag(torch.tensor([0.0, 4.0]))
    close(merge(IsoC, base, [d1, d2]), 3 * torch.eye(2))  # sum diag(2, 4): σ̄ = 3
    close(merge(IsoC, base, [d1, d2], weights=[1.0, 0.5], lambda_=1.5), 3 * torch.eye(2))  # diag(2, 2)·1.5


def test_iso_c_spectrum_is_flat_and_keeps_the_nuclear_norm():
    base, deltas = rnd((7, 10), 3, seed=1)
    delta = merge(IsoC, base, deltas) - base
    s = torch.linalg.svdvals(delta.double())
    nuclear = torch.linalg.svdvals(sum(d.double() for d in deltas)).sum()
    close(s, torch.full_like(s, float(nuclear) / 7))


def test_iso_cts_fills_a_direction_the_sum_lost():
    """δ₁ = diag(4, 3, −1, 0), δ₂ = diag(4, 3, −1, 2), f = 0.5: r = 4, c = 2, k = 1. The common
    subspace is e₁, e₂ (σ 8, 6); outside it δ₁ keeps −e₃e₃ᵀ (σ 1) and δ₂ keeps 2 e₄e₄ᵀ (its
    largest); σ̄ = (1 + 2 + 8 + 6)/4 = 4.25, Δ = 4.25 diag(1, 1, −1, 1)."""
    d1, d2 = torch.diag(torch.tensor([4.0, 3.0, -1.0, 0.0])), torch.diag(torch.tensor([4.0, 3.0, -1.0, 2.0]))
    close(merge(IsoCTS, torch.zeros(4, 4), [d1, d2], common_space_fraction=0.5),
          4.25 * torch.diag(torch.tensor([1.0, 1.0, -1.0, 1.0])))


def test_iso_cts_at_full_common_fraction_is_iso_c():
    base, deltas = rnd((6, 9), 3, seed=2)
    close(merge(IsoCTS, base, deltas, common_space_fraction=1.0), merge(IsoC, base, deltas))


@pytest.mark.parametrize("r,T,f,want", [(5, 2, 0.8, (5, 0)), (10, 2, 0.8, (8, 1)), (12, 3, 0.8, (9, 1)),
                                        (16, 3, 0.8, (13, 1)), (4, 2, 0.5, (2, 1)), (8, 3, 0.0, (2, 2)),
                                        (3, 2, 0.0, (1, 1)), (1, 3, 0.8, (1, 0))])
def test_iso_cts_dimensions(r, T, f, want):
    c, k = iso_cts_dims(r, T, f)
    assert (c, k) == want and c + T * k == r
    # the reference's rounding, wherever it gives a non-negative common size
    c_ref = r - round((r - int(r * f)) / T) * T
    if c_ref >= 0:
        assert c == c_ref


# ------------------------------------------------------------------------------------------ edge cases

@pytest.mark.parametrize("cls", [IsoC, IsoCTS])
@pytest.mark.parametrize("shape", [(7,), (2, 3, 4), ()])
def test_non_matrices_take_the_weighted_mean(cls, shape):
    base, deltas = rnd(shape, 3, seed=4)
    w = [1.0, 0.5, -2.0]
    want = base + 0.8 * (deltas[0] + 0.5 * deltas[1] - 2.0 * deltas[2]) / 3
    close(merge(cls, base, deltas, weights=w, key="model.norm.weight", lambda_=0.8), want, 1e-6)


@pytest.mark.parametrize("cls", [IsoC, IsoCTS])
def test_svd_false_and_zero_deltas(cls):
    base, deltas = rnd((5, 6), 2)
    close(merge(cls, base, deltas, svd=False), base + (deltas[0] + deltas[1]) / 2)
    assert torch.equal(merge(cls, base, [torch.zeros(5, 6)] * 3), base)
    assert merge(cls, torch.zeros(0, 3), [torch.zeros(0, 3)] * 2).shape == (0, 3)


@pytest.mark.parametrize("cls", [IsoC, IsoCTS])
def test_deterministic_and_order_independent(cls):
    base, deltas = rnd((9, 12), 3, seed=5)
    a = merge(cls, base, deltas, weights=[1.0, 0.5, 2.0])
    assert torch.equal(a, merge(cls, base, deltas, weights=[1.0, 0.5, 2.0]))
    close(merge(cls, base, deltas[::-1], weights=[2.0, 0.5, 1.0]), a)
    close(merge(cls, base, [-d for d in deltas], weights=[1.0, 0.5, 2.0]) - base, -(a - base))


@pytest.mark.parametrize("cls", [IsoC, IsoCTS])
def test_bfloat16_model_keeps_its_dtype(cls):
    base, deltas = rnd((6, 6), 2)
    b = StateDictSource({KEY: base.bfloat16()}, "base")
    es = [StateDictSource({KEY: (base + d).bfloat16()}, f"e{i}") for i, d in enumerate(deltas)]
    out = dict(run_plan(build_plan(b, es, cls())))[KEY]
    assert out.dtype == torch.bfloat16 and out.shape == (6, 6) and bool(torch.isfinite(out.float()).all())


def test_rank_deficient_sum_is_reported(caplog):
    """A rank-1 task vector on 4 × 4 (a LoRA-like delta): σ̄ goes to 3 directions it does not fix."""
    g = torch.Generator().manual_seed(6)
    d = torch.outer(torch.randn(4, generator=g), torch.randn(4, generator=g))
    with caplog.at_level(logging.DEBUG, logger="lightning_merge.methods.svd"):
        merge(IsoC, torch.zeros(4, 4), [d])
    assert any("iso_c" in r.message and "arbitrary" in r.message and "3 of 4" in r.message for r in caplog.records)


# ------------------------------------------------------------------------------------------ validation

@pytest.mark.parametrize("value", [-0.1, 1.1, float("nan"), "0.8", None])
def test_common_space_fraction_is_validated(value):
    with pytest.raises(ConfigError, match="common_space_fraction"):
        IsoCTS(common_space_fraction=value)


@pytest.mark.parametrize("cls", [IsoC, IsoCTS])
@pytest.mark.parametrize("params,name", [({"svd": 1}, "svd"), ({"lambda_": float("nan")}, "lambda_")])
def test_other_parameters_are_validated(cls, params, name):
    with pytest.raises(ConfigError, match=name):
        cls(**params)


def test_unknown_parameter_is_refused():
    with pytest.raises(ConfigError, match="common_space_fraction"):
        get_method("iso_c", common_space_fraction=0.5)


def test_needs_a_base():
    with pytest.raises(ConfigError, match="base"):
        IsoC().merge(TensorInputs(KEY, None, [torch.ones(2, 2)], [0], [1.0]))


# ------------------------------------------------------------------------------------------ YAML

def test_yaml_forms():
    models = [{"model": "e0"}, {"model": "e1", "parameters": {"weight": 0.5}}]
    r = parse_config({"merge_method": "iso_c", "base_model": "b", "models": models, "parameters": {"lambda": 1.5}})
    assert r.method == IsoC(lambda_=1.5) and r.weights == [1.0, 0.5] and r.experts == ["e0", "e1"]
    r = parse_config({"merge_method": "iso_cts", "base_model": "b", "models": models,
                      "parameters": {"common_space_fraction": 0.6, "svd": True}})
    assert r.method == IsoCTS(common_space_fraction=0.6)
    with pytest.raises(ConfigError, match=r"common_space_fraction.*outside \[0.0, 1.0\]"):
        parse_config({"merge_method": "iso_cts", "base_model": "b", "models": models,
                      "parameters": {"common_space_fraction": 1.5}})
    with pytest.raises(ConfigError, match="rank_fraction"):
        parse_config({"merge_method": "iso_cts", "base_model": "b", "models": models,
                      "parameters": {"rank_fraction": 0.5}})


# ------------------------------------------------------------------------------------------ references

@pytest.mark.parametrize("shape", [(6, 9), (9, 6), (8, 8), (16, 12)])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_matches_an_independent_float64_reference(shape, n):
    base, deltas = rnd(shape, n, seed=n)
    w = [1.0 + 0.5 * i for i in range(n)]
    close(merge(IsoC, base, deltas, weights=w, lambda_=0.9) - base, 0.9 * iso_c_reference(deltas, w).float())
    for f in (0.8, 0.5, 0.2):
        close(merge(IsoCTS, base, deltas, weights=w, common_space_fraction=f) - base,
              iso_cts_reference(deltas, f, w).float())


@pytest.mark.parametrize("shape", [(6, 9), (9, 6), (8, 8), (1, 5), (3, 2), (7,), (2, 3, 4)])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_parity_with_fusion_bench(shape, n):
    iso_c, iso_cts = reference(ISO, "iso_c"), reference(ISO, "iso_cts")
    base, deltas = rnd(shape, n, seed=10 + n)
    tvs = [{"w": d} for d in deltas]
    close(merge(IsoC, base, deltas, lambda_=1.2) - base, 1.2 * iso_c([dict(t) for t in tvs], accelerator="cpu")["w"])
    for f in (0.8, 0.5):
        close(merge(IsoCTS, base, deltas, common_space_fraction=f) - base,
              iso_cts([dict(t) for t in tvs], f, accelerator="cpu")["w"])


# ------------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    return make_llamas(tmp_path_factory.mktemp("iso_llamas"))


CONFIGS = {"iso_c": {"lambda": 1.5}, "iso_cts": {"common_space_fraction": 0.8}}


@pytest.fixture(scope="module")
def merged(llamas, tmp_path_factory):
    """``lightning-merge merge`` of each method's YAML (the embeddings excluded by a filter)."""
    out = {}
    for name, params in CONFIGS.items():
        config = {"merge_method": name, "base_model": str(llamas / "base"),
                  "models": [{"model": str(llamas / f"e{i}")} for i in range(3)],
                  "parameters": {**params, "svd": [{"filter": "embed_tokens", "value": False}, {"value": True}]}}
        out[name] = run_merge_cli(config, tmp_path_factory.mktemp(name) / "merged")
    return out


def _task_vectors(llamas):
    base = load_folder(llamas / "base")
    return base, [{k: v - base[k] for k, v in load_folder(llamas / f"e{i}").items()} for i in range(3)]


def test_end_to_end_matches_the_float64_reference(llamas, merged):
    base, tvs = _task_vectors(llamas)
    for name, ref, lam in (("iso_c", iso_c_reference, 1.5), ("iso_cts", iso_cts_reference, 1.0)):
        assert set(merged[name]) == set(base)
        for k, b in base.items():
            deltas = [tv[k] for tv in tvs]
            want = sum(d.double() for d in deltas) / 3 if "embed_tokens" in k else ref(deltas)
            close(merged[name][k] - b, lam * want.float())
            assert merged[name][k].dtype == b.dtype


def test_end_to_end_parity_with_fusion_bench(llamas, merged):
    iso_c, iso_cts = reference(ISO, "iso_c"), reference(ISO, "iso_cts")
    base, tvs = _task_vectors(llamas)
    exclude = ["model.embed_tokens.weight"]
    ref_c = iso_c([dict(t) for t in tvs], accelerator="cpu", exclude_keys=exclude)
    ref_cts = iso_cts([dict(t) for t in tvs], 0.8, accelerator="cpu", exclude_keys=exclude)
    for k, b in base.items():
        close(merged["iso_c"][k] - b, 1.5 * ref_c[k])
        close(merged["iso_cts"][k] - b, ref_cts[k])
