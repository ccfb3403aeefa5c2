"""DELLA / MagPrune: exact keep probabilities (spec §11.4), the fixed-mask pipeline (§11.5),
statistical properties (§5.7), edge rules (§5.2) and mergekit parity."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_merge.errors import ConfigError
from lightning_merge.methods.base import TensorInputs
from lightning_merge.methods.dare import dare_drop
from lightning_merge.methods.della import (
    Della,
    DellaLinear,
    keep_prob_by_rank,
    magprune,
    magprune_apply,
    magprune_keep_prob,
)
from lightning_merge.methods.kernels import (
    agreement_mask,
    bernoulli_keep,
    elect_and_fuse,
    elect_sign,
)
from lightning_merge.methods.registry import get_method

N_SEEDS = 4000


def _t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _reference_q(row: list[float], d: float, eps: float, formula: str) -> list[float]:
    """Straightforward float64 keep probabilities of one row (stable ties: lower index larger)."""
    n = len(row)
    if n == 1:
        return [d]
    order = sorted(range(n), key=lambda i: (-abs(row[i]), i))  # descending rank r = position
    q = [0.0] * n
    for r, i in enumerate(order):
        if formula == "code":
            rp = n - r  # ascending rank 1..n
            q[i] = (d - eps / 2) + eps * (rp - 1) / (n - 1)
        else:
            q[i] = 1.0 - ((1 - d) - eps / 2 + (eps / n) * r)
    return q


# ------------------------------------------------------------------------------ §11.4 exact vectors

def test_keep_prob_code_formula(vectors, tau_inputs):
    _, taus = tau_inputs
    expected = vectors["della_keep_probs_rowwise_code_d0.5_halfeps0.1"]
    for tau, exp in zip(taus, expected, strict=True):
        q = magprune_keep_prob(tau, 0.5, 0.2, "row", "code")  # paper ε = 0.2 = 2 × half-width 0.1
        assert q.dtype == torch.float32 and q.shape == tau.shape
        torch.testing.assert_close(q.double(), torch.tensor(exp, dtype=torch.float64), atol=1e-7, rtol=0)
        assert abs(float(q.double().mean()) - 0.5) < 1e-7


def test_keep_prob_paper_formula(vectors, tau_inputs):
    _, taus = tau_inputs
    expected = vectors["della_keep_probs_rowwise_paper_p0.5_eps0.2"]
    for tau, exp in zip(taus, expected, strict=True):
        q = magprune_keep_prob(tau, 0.5, 0.2, "row", "paper")
        torch.testing.assert_close(q.double(), torch.tensor(exp, dtype=torch.float64), atol=1e-7, rtol=0)
        assert abs(float(q.double().mean()) - (0.5 + 0.2 / 12)) < 1e-7  # 1 − p + ε/(2n)


def test_keep_prob_row_vs_layer(vectors, tau_inputs):
    _, taus = tau_inputs
    x = taus[0].reshape(2, 3)
    row = magprune_keep_prob(x, 0.5, 0.2, "row", "code")
    layer = magprune_keep_prob(x, 0.5, 0.2, "layer", "code")
    torch.testing.assert_close(row.double(), torch.tensor(vectors["della_keep_probs_2x3_model1_code"],
                                                          dtype=torch.float64), atol=1e-7, rtol=0)
    torch.testing.assert_close(layer.double(), torch.tensor(
        vectors["della_keep_probs_2x3_model1_layerwise_code"], dtype=torch.float64), atol=1e-7, rtol=0)


def test_keep_prob_batched_matches_per_row_reference():
    g = _gen(3)
    x = torch.randn(7, 3, 5, generator=g)
    x[2, 0, :2] = 0.5  # ties inside a row
    x[2, 1, 0] = -0.5
    for formula in ("code", "paper"):
        for scope in ("row", "layer"):
            q = magprune_keep_prob(x, 0.4, 0.3, scope, formula).double()
            rows = x.reshape(1, -1) if scope == "layer" else x.reshape(7, -1)
            ref = torch.tensor([_reference_q(r, 0.4, 0.3, formula) for r in rows.double().tolist()],
                               dtype=torch.float64).reshape(x.shape)
            torch.testing.assert_close(q, ref, atol=1e-7, rtol=0)


def test_ties_stable_lower_index_counts_larger():
    q = magprune_keep_prob(_t([0.5, -0.5, 0.5, 0.1]), 0.5, 0.3, "row", "code")
    assert float(q[0]) > float(q[1]) > float(q[2]) > float(q[3])


def test_keep_prob_by_rank_endpoints():
    q = keep_prob_by_rank(5, 0.5, 0.2, "code").double()
    assert abs(float(q[0]) - 0.6) < 1e-7 and abs(float(q[-1]) - 0.4) < 1e-7
    p = keep_prob_by_rank(5, 0.5, 0.2, "paper").double()
    assert abs(float(p[0]) - 0.6) < 1e-7 and abs(float(p[-1]) - (0.6 - 0.2 * 4 / 5)) < 1e-7


# ------------------------------------------------------------------------ §11.5 fixed-mask pipeline

def test_fixed_mask_pipeline(vectors, tau_inputs):
    base, taus = tau_inputs
    ref = vectors["della_fixed_mask_code_probs"]
    masks = [torch.tensor(m, dtype=torch.bool) for m in ref["keep_mask"]]
    rescaled = []
    for tau, m, exp in zip(taus, masks, ref["rescaled"], strict=True):
        q = magprune_keep_prob(tau, 0.5, 0.2)
        out = magprune_apply(tau, m, q, "inverse_prob")
        torch.testing.assert_close(out, _t(exp), atol=1e-6, rtol=1e-6)
        rescaled.append(out)
    x = torch.stack(rescaled)
    w = [1.0, 1.0, 1.0]
    gamma = elect_sign(x, w)
    torch.testing.assert_close(gamma, _t(ref["elected_sign"]))
    assert agreement_mask(x, gamma).to(torch.int64).tolist() == ref["mask"]
    fused = elect_and_fuse(x, w)
    torch.testing.assert_close(fused, _t(ref["fused_delta"]), atol=1e-6, rtol=1e-6)
    theta = base + ref["lambda"] * fused
    torch.testing.assert_close(theta, _t(ref["theta"]), atol=1e-6, rtol=1e-6)


def test_apply_other_rescales(tau_inputs):
    _, taus = tau_inputs
    tau = taus[0]
    m = torch.tensor([1, 0, 0, 1, 0, 1], dtype=torch.bool)
    q = magprune_keep_prob(tau, 0.5, 0.2)
    kept = tau * m
    torch.testing.assert_close(magprune_apply(tau, m, q, "none"), kept)
    for mode, order in (("l1", 1), ("l2", 2), ("linf", math.inf)):
        out = magprune_apply(tau, m, q, mode)
        assert abs(float(torch.linalg.vector_norm(out, ord=order))
                   - float(torch.linalg.vector_norm(tau, ord=order))) < 1e-6
        torch.testing.assert_close(out / out.abs().max(), kept / kept.abs().max())


def test_della_merge_is_the_composition(tau_inputs):
    """Della.merge = MagPrune with inputs.stream(i), elect, disjoint mean, λ."""
    base, taus = tau_inputs

    def fresh(seed: int) -> TensorInputs:  # a method owns (and may overwrite) its input tensors
        return TensorInputs("w", base, [t.clone() for t in taus], [0, 1, 2], [1.0, 1.0, 1.0], seed=seed)

    inputs = fresh(11)
    method = Della(density=0.5, epsilon=0.2, lambda_=1.1)
    got = method.merge(inputs)
    dropped = []
    for i, tau in enumerate(taus):
        q = magprune_keep_prob(tau, 0.5, 0.2)
        dropped.append(magprune_apply(tau, bernoulli_keep(q, tau, inputs.stream(i)), q))
    x = torch.stack(dropped)
    expected = base + 1.1 * elect_and_fuse(x, inputs.weights)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(method.merge(fresh(11)), got)  # deterministic per seed
    other = method.merge(fresh(12))
    assert not torch.equal(other, got)


def test_della_linear_is_weighted_sum(tau_inputs):
    base, taus = tau_inputs
    w = [1.0, 2.0, 0.5]
    def fresh() -> TensorInputs:  # a method owns (and may overwrite) its input tensors
        return TensorInputs("w", base, [t.clone() for t in taus], [0, 1, 2], w, seed=5)

    inputs = fresh()
    dropped = [magprune(t, 0.6, 0.2, inputs.stream(i)) for i, t in enumerate(taus)]
    got = DellaLinear(density=0.6, epsilon=0.2, lambda_=0.5).merge(inputs)
    torch.testing.assert_close(got, base + 0.5 * sum(wi * d for wi, d in zip(w, dropped, strict=True)))
    got_n = DellaLinear(density=0.6, epsilon=0.2, normalize=True).merge(fresh())
    torch.testing.assert_close(got_n, base + sum(wi * d for wi, d in zip(w, dropped, strict=True)) / 3.5)


def test_registered_names():
    assert isinstance(get_method("della", density=0.5, epsilon=0.1, **{"lambda": 1.1}), Della)
    assert isinstance(get_method("della_linear"), DellaLinear)
    assert DellaLinear().normalize is False and Della().normalize is True


# ----------------------------------------------------------------------------- §5.7 statistics

def _draws(delta: torch.Tensor, d: float, eps: float, formula: str = "code", rescale: str = "inverse_prob"):
    return torch.stack([
        magprune(delta, d, eps, _gen(s), prob_formula=formula, rescale=rescale) for s in range(N_SEEDS)
    ])


@pytest.mark.parametrize("formula", ["code", "paper"])
def test_keep_frequency_matches_q_and_is_monotone(formula):
    delta = _t([0.3, -1.2, 0.05, 2.0, -0.7, 0.9, -0.15, 1.5])
    d, eps = 0.5, 0.4
    out = _draws(delta, d, eps, formula)
    freq = (out != 0).double().mean(0)
    q = magprune_keep_prob(delta, d, eps, prob_formula=formula).double()
    sigma = (q * (1 - q) / N_SEEDS).sqrt()
    assert bool(((freq - q).abs() <= 5 * sigma).all()), (freq, q)
    order = torch.argsort(delta.abs(), descending=True)
    f_sorted = freq[order]
    s_sorted = sigma[order]
    for a in range(len(order) - 1):  # larger |δ| kept at least as often, within 5σ of the difference
        tol = 5 * math.sqrt(float(s_sorted[a]) ** 2 + float(s_sorted[a + 1]) ** 2)
        assert float(f_sorted[a]) >= float(f_sorted[a + 1]) - tol
    n = delta.numel()
    target = d if formula == "code" else d + eps / (2 * n)
    row_sigma = float((q * (1 - q)).sum().sqrt()) / (n * math.sqrt(N_SEEDS))
    assert abs(float(freq.mean()) - target) <= 5 * row_sigma


def test_rescaled_output_is_unbiased():
    delta = _t([0.3, -1.2, 0.05, 2.0, -0.7, 0.9])
    d, eps = 0.4, 0.3
    out = _draws(delta, d, eps).double()
    q = magprune_keep_prob(delta, d, eps).double()
    tol = 5 * delta.double().abs() * ((1 - q) / (q * N_SEEDS)).sqrt()
    assert bool(((out.mean(0) - delta.double()).abs() <= tol).all())


def test_epsilon_zero_is_dare():
    delta = _t([0.3, -1.2, 0.05, 2.0, -0.7, 0.9, 0.0, 4.0])
    q = magprune_keep_prob(delta, 0.3, 0.0)
    assert bool((q == torch.tensor(0.3, dtype=torch.float32)).all())
    for d in (0.5, 0.25, 0.3):  # same uniforms, same threshold → the very same draw as DARE
        for s in range(20):
            torch.testing.assert_close(magprune(delta, d, 0.0, _gen(s)), dare_drop(delta, d, _gen(s)))
    out = _draws(delta[:6], 0.3, 0.0)
    rate = float((out != 0).double().mean())
    assert abs(rate - 0.3) <= 5 * math.sqrt(0.3 * 0.7 / (6 * N_SEEDS))


# -------------------------------------------------------------------------------------- edge rules

def test_density_one_is_identity(tau_inputs):
    base, taus = tau_inputs
    assert magprune(taus[0], 1.0, 0.6, _gen(0)) is taus[0]
    assert bool((magprune_keep_prob(taus[0], 1.0, 0.6) == 1).all())
    def inputs() -> TensorInputs:  # methods own (and may overwrite) their input tensors
        return TensorInputs("w", base, [taus[1].clone()], [0], [1.0], seed=1)

    torch.testing.assert_close(Della(density=1.0, epsilon=0.9).merge(inputs()), base + taus[1])
    torch.testing.assert_close(DellaLinear(density=1.0).merge(inputs()), base + taus[1])


def test_row_of_length_one():
    x = _t([[0.5], [-2.0], [0.0], [1.0]])
    for formula in ("code", "paper"):
        q = magprune_keep_prob(x, 0.3, 0.2, "row", formula)
        assert bool((q == torch.tensor(0.3, dtype=torch.float32)).all())
        assert float(magprune_keep_prob(_t([0.7]), 0.3, 0.2, "row", formula)) == pytest.approx(0.3)
    base = torch.zeros(4, 1)
    out = Della(density=0.3, epsilon=0.2).merge(TensorInputs("b", base, [x, -x], [0, 1], [1.0, 1.0]))
    assert bool(torch.isfinite(out).all())


def test_higher_dim_rows_and_empty():
    x = torch.randn(2, 3, 4, generator=_gen(1))
    torch.testing.assert_close(magprune_keep_prob(x, 0.5, 0.2), magprune_keep_prob(x.reshape(2, 12), 0.5, 0.2)
                               .reshape(2, 3, 4))
    torch.testing.assert_close(magprune_keep_prob(x, 0.5, 0.2, "layer"),
                               magprune_keep_prob(x.reshape(-1), 0.5, 0.2).reshape(2, 3, 4))
    assert magprune_keep_prob(torch.zeros(0), 0.5, 0.2).shape == (0,)


def test_all_zero_delta_returns_base():
    base = _t([1.0, 2.0, 3.0])
    out = Della().merge(TensorInputs("z", base, [torch.zeros(3), torch.zeros(3)], [0, 1], [1.0, 1.0]))
    torch.testing.assert_close(out, base)


def test_per_expert_density_and_epsilon(tau_inputs):
    base, taus = tau_inputs
    m = Della(density=[1.0, 0.5], epsilon=[0.0, 0.2])
    m.check_experts(2)
    with pytest.raises(ConfigError, match="density"):
        m.check_experts(3)
    inputs = TensorInputs("w", base, [taus[0].clone()], [0], [1.0], n_experts=2)
    torch.testing.assert_close(m.merge(inputs), base + taus[0])  # expert 0: density 1 → identity


@pytest.mark.parametrize("params, names", [
    ({"density": 0.1, "epsilon": 0.3}, ("density", "epsilon")),   # d − ε/2 < 0
    ({"density": 0.95, "epsilon": 0.2}, ("density", "epsilon")),  # d + ε/2 > 1
    ({"density": 0.5, "epsilon": 1.0}, ("density", "epsilon")),   # d − ε/2 = 0
    ({"density": [0.5, 0.1], "epsilon": 0.3}, ("density", "expert 1")),
    ({"density": 0.0}, ("density",)),
    ({"density": 1.5}, ("density",)),
    ({"epsilon": -0.1}, ("epsilon",)),
    ({"rank_scope": "column"}, ("rank_scope",)),
    ({"prob_formula": "mergekit"}, ("prob_formula",)),
    ({"rescale": "l3"}, ("rescale",)),
    ({"zero_sign": "negative"}, ("zero_sign",)),
    ({"lambda_": float("nan")}, ("lambda_",)),
])
def test_bad_hyperparameters(params, names):
    with pytest.raises(ConfigError) as err:
        Della(**params)
    for name in names:
        assert name in str(err.value)


def test_window_error_says_what_works():
    with pytest.raises(ConfigError, match=r"epsilon < 0\.2"):
        DellaLinear(density=0.1, epsilon=0.3)
    DellaLinear(density=0.9, epsilon=0.2)  # d + ε/2 = 1 is allowed
    DellaLinear(density=1.0, epsilon=0.9)  # ε is ignored at d = 1
    Della(density=0.5, epsilon=0.2, prob_formula="paper")


def test_large_tensor_is_batched():
    x = torch.randn(256, 512, generator=_gen(2))
    q = magprune_keep_prob(x, 0.5, 0.2)
    torch.testing.assert_close(q.double().mean(1), torch.full((256,), 0.5, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    big = torch.argmax(x.abs(), dim=1)
    assert bool((q[torch.arange(256), big] == q.max()).all())


# ----------------------------------------------------------------------------------- mergekit parity

@pytest.mark.parity
@pytest.mark.parametrize("consensus", [True, False])
def test_mergekit_parity_with_fixed_masks(monkeypatch, consensus):
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    g = _gen(7)
    base = torch.randn(5, 16, generator=g)
    deltas = [torch.randn(5, 16, generator=g) for _ in range(3)]
    dens, half_eps, w = [0.5, 0.4, 0.6], [0.1, 0.15, 0.05], [1.0, 0.7, 1.3]
    masks = [torch.rand(5, 16, generator=g) < 0.5 for _ in range(3)]
    seen: list[torch.Tensor] = []

    def fake_bernoulli(probs, *args, **kwargs):
        seen.append(probs.clone())
        return masks[len(seen) - 1].to(probs.dtype)

    monkeypatch.setattr(torch, "bernoulli", fake_bernoulli)
    mk = registry.get("della" if consensus else "della_linear")
    group = TensorGroup.from_tensors([base] + [base + d for d in deltas], base_index=0)
    params = {"int8_mask": False, "normalize": consensus, "rescale": True, "lambda": 1.2,
              "weight": {i + 1: w[i] for i in range(3)}, "density": {i + 1: dens[i] for i in range(3)},
              "epsilon": {i + 1: half_eps[i] for i in range(3)}}
    expected = mk.merge_group(group, **params)
    monkeypatch.undo()

    ours = []
    for i in range(3):
        q = magprune_keep_prob(deltas[i], dens[i], 2 * half_eps[i])  # ours is the full window
        torch.testing.assert_close(q, seen[i].reshape(q.shape), atol=1e-6, rtol=0)
        ours.append(magprune_apply(deltas[i], masks[i], q, "l1"))
    x = torch.stack(ours)
    wt = torch.tensor(w, dtype=torch.float32)
    if consensus:
        delta = elect_and_fuse(x, wt)
    else:
        delta = (x * wt.view(-1, 1, 1)).sum(0)
    torch.testing.assert_close(base + 1.2 * delta, expected, atol=1e-5, rtol=1e-5)
