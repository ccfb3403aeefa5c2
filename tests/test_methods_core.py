"""Exact spec vectors (algorithms.md §11.1-11.3) and statistics for soups, TA, TIES and DARE."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_merge import ConfigError, DareLinear, DareTies, Linear, TaskArithmetic, Ties, get_method
from lightning_merge.methods import TensorInputs
from lightning_merge.methods.dare import dare_drop
from lightning_merge.methods.kernels import elect_and_fuse, generator_for, topk_mask

T = torch.tensor


def inputs(base, tensors, weights=(1.0, 1.0, 1.0), seed=0, name="w"):
    """Methods own (and may modify) their input tensors: hand them copies."""
    return TensorInputs(name, base, [t.clone() for t in tensors], list(range(len(tensors))), list(weights),
                        seed=seed)


def close(a, b, atol=1e-6):
    torch.testing.assert_close(a, T(b, dtype=torch.float32), atol=atol, rtol=0)


def test_task_arithmetic_vectors(vectors, tau_inputs):
    base, taus = tau_inputs
    close(TaskArithmetic(lambda_=0.5).merge(inputs(base, taus)), vectors["task_arithmetic_lambda0.5"])
    close(TaskArithmetic().merge(inputs(base, taus, (1, 2, 0.5))), vectors["task_arithmetic_weights_1_2_0.5_lambda1"])


def test_soup_vectors(vectors, tau_inputs):
    base, taus = tau_inputs
    models = [base + t for t in taus]
    close(Linear().merge(inputs(None, models)), vectors["uniform_soup"])
    close(Linear().merge(inputs(None, models, (1, 2, 0.5))), vectors["weighted_soup_w_1_2_0.5_normalized"])
    # the uniform soup equals TA with lambda = 1/T
    close(Linear().merge(inputs(None, models)), TaskArithmetic(lambda_=1 / 3).merge(inputs(base, taus)).tolist())


def test_ties_vectors(vectors, tau_inputs):
    base, taus = tau_inputs
    ex = vectors["ties_d0.5_exactk"]
    m = Ties(density=0.5)
    for got, want in zip(m.trim(inputs(base, taus)), ex["trimmed"]):
        close(got, want)
    close(m.merge(inputs(base, taus)), ex["theta_lambda1"])
    close(Ties(density=0.5, trim_rule="official").merge(inputs(base, taus)),
          vectors["ties_d0.5_official_threshold"]["theta_lambda1"])
    close(Ties(density=1.0).merge(inputs(base, taus)), vectors["ties_d1.0_no_trim"]["theta_lambda1"])
    w = vectors["ties_weighted_mergekit_style"]["weights"]
    close(Ties(density=0.5).merge(inputs(base, taus, w)) - base,
          vectors["ties_weighted_mergekit_style"]["merged_delta"])
    peft = Ties(density=0.5, election="unweighted", divisor="count")
    close(peft.merge(inputs(base, taus, w)) - base, vectors["ties_weighted_peft_style"]["merged_delta"])


def test_ties_zero_sign_majority():
    base = torch.zeros(4)
    taus = [T([1.0, 2.0, 3.0, -1.0]), T([2.0, 1.0, 1.0, 1.0])]
    # entry 3 cancels exactly: S = 0. Positive rule elects +, majority rule the sign of Σ γ over the tensor (+).
    out = Ties(density=1.0, zero_sign="majority").merge(inputs(base, taus, (1, 1)))
    close(out, [1.5, 1.5, 2.0, 1.0])
    taus = [T([-1.0, -2.0, -3.0, -1.0]), T([-2.0, -1.0, -1.0, 1.0])]
    out = Ties(density=1.0, zero_sign="majority").merge(inputs(base, taus, (1, 1)))
    close(out, [-1.5, -1.5, -2.0, -1.0])
    close(Ties(density=1.0).merge(inputs(base, taus, (1, 1))), [-1.5, -1.5, -2.0, 1.0])


def test_dare_fixed_mask_vectors(vectors):
    """§11.3: the combination steps on the given rescaled deltas δ̂ = m·τ/0.5."""
    base = T(vectors["inputs"]["base"])
    ex = vectors["dare_fixed_mask"]
    taus = [T(t) for t in vectors["inputs"]["tau"]]
    rescaled = [t * T(m, dtype=torch.float32) / 0.5 for t, m in zip(taus, ex["keep_mask"])]
    for got, want in zip(rescaled, ex["rescaled"]):
        close(got, want)
    x = torch.stack(rescaled)
    w = torch.ones(3)
    close(base + x.sum(0), vectors["dare_linear_fixed_mask_lambda1"])
    ties = vectors["dare_ties_fixed_mask"]
    close(base + elect_and_fuse(x, w), ties["theta_mean_lambda1"])
    close(base + elect_and_fuse(x, w, normalize=False), ties["theta_sum_lambda1_mergekit_default"])


def test_topk_mask_stable_ties():
    x = T([1.0, -1.0, 1.0, 0.5])
    assert topk_mask(x, 0.5).tolist() == [True, True, False, False]
    assert topk_mask(x, 0.1).tolist() == [False] * 4
    assert topk_mask(x, 1.0).all()


# --------------------------------------------------------------------------------- DARE statistics

def _draws(delta: torch.Tensor, density: float, n_seeds: int) -> torch.Tensor:
    return torch.stack([dare_drop(delta, density, generator_for(s, "t", 0)) for s in range(n_seeds)])


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_keep_rate_and_unbiased(density):
    """Kept fraction within 5σ of d; per-element mean within 5σ of δ (spec §11.3, N·n = 8M draws)."""
    n, n_seeds = 4096, 2000
    delta = torch.linspace(-1, 1, n) + 0.001
    draws = _draws(delta, density, n_seeds)
    p = 1 - density
    kept = (draws != 0).float().mean().item()
    assert abs(kept - density) < 5 * math.sqrt(p * density / (n * n_seeds))
    mean = draws.mean(0)
    tol = 5 * delta.abs() * math.sqrt(p / (density * n_seeds))
    assert bool(((mean - delta).abs() <= tol + 1e-6).all())
    # kept entries are exactly δ/d
    nz = draws[0] != 0
    torch.testing.assert_close(draws[0][nz], delta[nz] / density)


def test_dare_linear_mean_is_task_arithmetic(tau_inputs):
    base, taus = tau_inputs
    big = [t.repeat(50) for t in taus]
    b = base.repeat(50)
    n_seeds = 3000
    acc = torch.zeros_like(b, dtype=torch.float64)
    for s in range(n_seeds):
        acc += DareLinear(density=0.5).merge(inputs(b, big, seed=s)).double()
    ta = TaskArithmetic().merge(inputs(b, big)).double()
    # Var of one merged entry = Σ_t δ_t² (p/(1-p)) with p = 0.5; 5σ bound on the mean of n_seeds draws
    sd = torch.stack(big).double().pow(2).sum(0).sqrt() / math.sqrt(n_seeds)
    assert bool(((acc / n_seeds - ta).abs() <= 5 * sd + 1e-9).all())


def test_dare_extremes_exact(tau_inputs):
    base, taus = tau_inputs
    close(DareLinear(density=1.0).merge(inputs(base, taus)), TaskArithmetic().merge(inputs(base, taus)).tolist())
    close(DareTies(density=1.0).merge(inputs(base, taus)), Ties(density=1.0).merge(inputs(base, taus)).tolist())
    assert torch.equal(dare_drop(taus[0], 0.0, generator_for(0, "x", 0)), torch.zeros(6))


def test_dare_seeding_is_per_tensor_and_expert(tau_inputs):
    base, taus = tau_inputs
    big = [t.repeat(100) for t in taus]
    b = base.repeat(100)
    m = DareTies(density=0.3)
    a1 = m.merge(inputs(b, big, seed=7, name="a"))
    a2 = m.merge(inputs(b, big, seed=7, name="a"))
    c = m.merge(inputs(b, big, seed=7, name="c"))
    d = m.merge(inputs(b, big, seed=8, name="a"))
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, c) and not torch.equal(a1, d)


def test_dare_l1_rescale_matches_norm():
    delta = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    out = dare_drop(delta, 0.3, generator_for(1, "x", 0), rescale="l1")
    assert math.isclose(out.abs().sum().item(), delta.abs().sum().item(), rel_tol=1e-5)
    assert ((out != 0).float().mean().item() - 0.3) < 0.06


# ------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize(
    "make, pname",
    [
        (lambda: Ties(density=0.0), "density"),
        (lambda: Ties(density=1.5), "density"),
        (lambda: DareTies(density=-0.1), "density"),
        (lambda: DareLinear(density=0.5, rescale="l3"), "rescale"),
        (lambda: TaskArithmetic(lambda_=float("nan")), "lambda_"),
        (lambda: Ties(trim_scope="model"), "trim_scope"),
        (lambda: get_method("ties", densty=0.5), "densty"),
        (lambda: get_method("frankenmerge"), "frankenmerge"),
    ],
)
def test_bad_hyperparameters_name_the_parameter(make, pname):
    with pytest.raises(ConfigError, match=pname):
        make()


def test_get_method_lambda_alias():
    m = get_method("ties", density=0.3, **{"lambda": 0.7})
    assert isinstance(m, Ties) and m.lambda_ == 0.7 and m.density == 0.3


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.sampled_from([0.0, 1.0, -1.0, 2.0, -2.0, 1e-30, -1e30, 3.5]), min_size=1, max_size=50),
       density=st.floats(0.0, 1.0))
def test_topk_mask_equals_stable_sort_reference(values, density):
    """Radix-select top-k keeps exactly the first ⌊d·n⌋ entries of a stable descending sort by |x|."""
    x = torch.tensor(values, dtype=torch.float32)
    k = int(density * x.numel())
    want = torch.zeros(x.numel(), dtype=torch.bool)
    if density >= 1.0:
        want[:] = True
    elif k > 0:
        want[torch.sort(x.abs(), descending=True, stable=True).indices[:k]] = True
    assert torch.equal(topk_mask(x, density), want)
