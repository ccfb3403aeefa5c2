"""Sens-Merging: the factor formulas on hand-computed cases, the calibration statistics against an
analytic linear model, identical experts giving plain task arithmetic, ``SensScaled`` == per-tensor
weights for TA / TIES, and ``SensMergeCallback`` in a Trainer."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from test_learned_helpers import classifier, make_zoo, trainer_kwargs
from torch import nn
from torch.func import functional_call

from lightning_merge import ConfigError, TaskArithmetic, Ties, merge_models
from lightning_merge.learned import (
    ExpertBank,
    PerTaskTokensDataModule,
    SensFactors,
    SensMergeCallback,
    SensScaled,
    compute_sens_factors,
    sens_factors,
)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, str]:
    return make_zoo(tmp_path_factory.mktemp("sens_zoo"))


def experts(zoo) -> list[str]:
    return [zoo["e0"], zoo["e1"], zoo["lora"]]


def softmax(xs: list[float], t: float = 1.0) -> list[float]:
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def test_factor_formulas_by_hand():
    s = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    d = torch.tensor([[0.0, 1.0], [3.0, 0.0]])
    alpha, tau, sigma = sens_factors(s, d, layer_temperature=0.5, cross_temperature=2.0, temperature=0.7)
    a0 = [2 * v for v in softmax([1 / 3, 1.0], 0.5)]
    assert alpha[0].tolist() == pytest.approx(a0, abs=1e-12) and alpha[1].tolist() == pytest.approx([1.0, 1.0])
    t = [2 * v for v in softmax([-1 / 3, -1.0], 2.0)]
    assert tau.tolist() == pytest.approx(t, abs=1e-12)
    for layer in range(2):
        want = [2 * v for v in softmax([a0[layer] * t[0], 1.0 * t[1]], 0.7)]
        assert sigma[:, layer].tolist() == pytest.approx(want, abs=1e-12)
    _, _, prod = sens_factors(s, d, combine="product")
    a, tt, _ = sens_factors(s, d)
    assert torch.allclose(prod, a * tt[:, None])
    # uniform sensitivities and distances: every factor is exactly 1
    _, tau1, sigma1 = sens_factors(torch.full((3, 4), 2.0), torch.ones(3, 3))
    assert torch.equal(tau1, torch.ones(3, dtype=torch.float64)) and torch.equal(sigma1, torch.ones(3, 4).double())


class TwoHeads(nn.Module):
    """logits = A x + B x: two 'layers' with the same gradient, so s_l = Σ|W_l ⊙ g| by hand."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4, bias=False)
        self.b = nn.Linear(3, 4, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(a)
            self.b.weight.copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def test_statistics_match_the_analytic_linear_model():
    gen = torch.Generator().manual_seed(0)
    w = [torch.randn(4, 3, generator=gen) for _ in range(4)]  # base a/b, then expert offsets
    base = TwoHeads(w[0], w[1])
    ex = [TwoHeads(w[0] + 0.5 * w[2], w[1]), TwoHeads(w[0], w[1] - 0.5 * w[3])]
    data = {t: [{"x": torch.randn(5, 3, generator=gen), "labels": torch.randint(0, 4, (5,), generator=gen)}]
            for t in ("p", "q")}
    bank = ExpertBank.build(base, ex, adopt=False)

    def call(params, inputs):
        return functional_call(base, params, kwargs={"x": inputs["x"]})

    f = compute_sens_factors(bank, call, data, ["p", "q"], group_by="layer")
    assert f.groups == ["a", "b"]
    for i, (e, task) in enumerate(zip(ex, ("p", "q"))):
        x, y = data[task][0]["x"].double(), data[task][0]["labels"]
        a, b = e.a.weight.detach().double(), e.b.weight.detach().double()
        p = torch.softmax(x @ (a + b).T, -1)
        g = (p - nn.functional.one_hot(y, 4).double()).T @ x / len(x)  # ∂ mean CE / ∂W
        assert f.sensitivity[i] == pytest.approx([float((a * g).abs().sum()), float((b * g).abs().sum())], rel=1e-5)
    for i, j in ((0, 1), (1, 0)):
        x = data[("p", "q")[j]][0]["x"]
        with torch.no_grad():
            zi, zj = ex[i](x), ex[j](x)
        assert f.distance[i][j] == pytest.approx(float((zi - zj).norm(dim=-1).mean()), rel=1e-5)
    # identical experts, calibrated on the same data: plain task arithmetic (sigma = 1 everywhere)
    same = compute_sens_factors(ExpertBank.build(base, [ex[0], ex[0]], adopt=False), call,
                                {"p": data["p"], "q": data["p"]}, ["p", "q"])
    assert same.distance == [[0.0, 0.0], [0.0, 0.0]]
    assert torch.allclose(torch.tensor(same.sigma, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64))


def hand_factors(zoo, tmp_path) -> tuple[SensFactors, str]:
    names = [n for n, _ in classifier(0).named_parameters()]
    from lightning_merge.lightning import group_of

    groups = list(dict.fromkeys(group_of(n) for n in names))
    gen = torch.Generator().manual_seed(3)
    sigma = (0.5 + torch.rand(3, len(groups), generator=gen)).tolist()
    f = SensFactors(experts=["e0", "e1", "lora"], groups=groups, tensor_groups={n: group_of(n) for n in names},
                    sensitivity=sigma, distance=[[0.0] * 3] * 3, alpha=sigma, tau=[1.0] * 3, sigma=sigma)
    path = str(f.save(tmp_path / "factors.json"))
    assert SensFactors.load(path) == f
    return f, path


def test_sens_scaled_is_per_tensor_weights(zoo, tmp_path):
    f, path = hand_factors(zoo, tmp_path)
    ta = merge_models(zoo["base"], experts(zoo), SensScaled(factors=path, method_params={"lambda": 0.5}))
    want = merge_models(zoo["base"], experts(zoo), TaskArithmetic(lambda_=0.5), tensor_params=f.tensor_params)
    assert all(torch.equal(ta[k], want[k]) for k in want)
    base = merge_models(zoo["base"], experts(zoo), TaskArithmetic(lambda_=0.0))
    deltas = [merge_models(zoo["base"], [e], TaskArithmetic()) for e in experts(zoo)]
    k = "model.layers.1.self_attn.q_proj.weight"
    manual = base[k] + 0.5 * sum(s * (d[k] - base[k]) for s, d in zip(f.weights(k), deltas))
    assert torch.allclose(ta[k], manual, atol=1e-6)
    ties = merge_models(zoo["base"], experts(zoo), SensScaled(factors=path, method="ties",
                                                               method_params={"density": 0.5}))
    want = merge_models(zoo["base"], experts(zoo), Ties(density=0.5), tensor_params=f.tensor_params)
    assert all(torch.equal(ties[k], want[k]) for k in want)
    with pytest.raises(ConfigError, match="experts"):
        merge_models(zoo["base"], experts(zoo)[:2], SensScaled(factors=path))
    with pytest.raises(ConfigError, match="factors"):
        SensScaled()


class LitClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = classifier(0)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.log("val_loss", self.model(**batch).loss)


def sens_data() -> PerTaskTokensDataModule:
    return PerTaskTokensDataModule(vocab_size=64, seq_len=6, n_train=16, n_val=8, num_labels=4, tasks=["x", "y", "z"],
                                   batch_size=8)


def test_callback_calibrates_then_merges_with_per_layer_weights(zoo, tmp_path):
    cb = SensMergeCallback(experts(zoo), "task_arithmetic", method_params={"lambda": 0.5}, calibration_batches=2,
                           temperature=0.5, factors_out=str(tmp_path / "f.json"), target="model")
    module = LitClassifier()
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], limit_val_batches=1)).validate(module, datamodule=sens_data())
    assert cb.merged and cb.factors is not None
    assert SensFactors.load(tmp_path / "f.json") == cb.factors
    assert len(set(round(v, 6) for row in cb.factors.sigma for v in row)) > 1  # not uniform
    want = merge_models(zoo["base"], experts(zoo), TaskArithmetic(lambda_=0.5),
                        tensor_params=cb.factors.scaled([1.0, 1.0, 1.0]))
    got = module.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items() if k in got)
    # the same factors from the pure function on the same batches
    bank = ExpertBank.build(classifier(0), experts(zoo), adopt=False)
    target = classifier(0)
    loaders = sens_data().train_dataloader()
    f = compute_sens_factors(bank, lambda p, b: functional_call(target, p, kwargs=dict(b)), loaders, ["x", "y", "z"],
                             max_batches=2, temperature=0.5)
    assert torch.allclose(torch.tensor(f.sigma), torch.tensor(cb.factors.sigma), atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    ({"calibration_batches": 0}, "calibration_batches"),
    ({"temperature": -1.0}, "temperature"),
    ({"combine": "max"}, "combine"),
    ({"group_by": "block"}, "group_by"),
    ({"expert_tasks": ["x"]}, "expert_tasks"),
    ({"method": "ties", "method_params": {"density": 2.0}}, "density"),
])
def test_callback_configuration_errors(zoo, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SensMergeCallback(experts(zoo), **kwargs)


def test_callback_without_per_task_data_fails_naming_the_fix(zoo, tmp_path):
    import torch.utils.data as tud

    class Plain(pl.LightningDataModule):
        def train_dataloader(self):
            return tud.DataLoader([1, 2])

        def val_dataloader(self):
            return tud.DataLoader([1, 2])

    cb = SensMergeCallback(experts(zoo), target="model")
    with pytest.raises(ConfigError, match="per-task"):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb])).validate(LitClassifier(), datamodule=Plain())
