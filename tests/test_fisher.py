"""Fisher merging: the weighted average on hand-worked cases, Fishers from gradients against the
analytic softmax regression, FusionBench 0.2.33 parity, the callback in a Trainer (the offline
merge from its saved statistics is identical) and 2-process DDP == 1 process."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from svd_helpers import reference
from test_learned_helpers import DumpModel, make_zoo, trainer_kwargs
from test_learned_sens import LitClassifier, sens_data
from torch import nn
from torch.func import functional_call

from lightning_merge import ConfigError, get_method, merge_models
from lightning_merge.learned import ExpertBank, Fisher, FisherMergeCallback, MergeStatistics, collect_fishers
from lightning_merge.learned.regmean import fisher_average
from lightning_merge.methods import TensorInputs

FISHER = "fusion_bench/method/fisher_merging/fisher_merging.py"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def stats_of(fishers: list[dict[str, torch.Tensor]], counts: float = 1.0) -> MergeStatistics:
    s = MergeStatistics(kind="fisher", experts=[f"e{i}" for i in range(len(fishers))])
    for e, f in enumerate(fishers):
        for n, t in f.items():
            s.add(n, e, t * counts, counts)
    return s


def test_hand_worked_fisher_average():
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 6.0, -1.0])
    fa, fb = torch.tensor([1.0, 0.0, 3.0]), torch.tensor([1.0, 2.0, 1.0])
    got = fisher_average([a, b], [fa, fb], [1.0, 1.0], floor=0.0 + 1e-12)
    torch.testing.assert_close(got, torch.tensor([2.0, 6.0, 2.0]), rtol=0, atol=1e-6)
    # equal Fishers: the weighted average; the floor alone (zero Fishers): also the weighted average
    torch.testing.assert_close(fisher_average([a, b], [fb, fb], [1.0, 3.0]), (a + 3 * b) / 4, rtol=0, atol=1e-6)
    z = torch.zeros(3)
    torch.testing.assert_close(fisher_average([a, b], [z, z], [1.0, 3.0], floor=1e-6), (a + 3 * b) / 4,
                               rtol=0, atol=1e-6)
    m = Fisher(normalize=False).with_statistics(stats_of([{"w": fa}, {"w": fb}]))
    torch.testing.assert_close(m.merge(TensorInputs("w", None, [a.clone(), b.clone()], [0, 1], [1.0, 1.0])),
                               fisher_average([a, b], [fa, fb], [1.0, 1.0]), rtol=0, atol=0)
    assert torch.equal(m.merge(TensorInputs("w", None, [a], [0], [1.0])), a)  # one expert: that expert


def test_normalization_scales_each_expert_by_its_inverse_fisher_norm():
    fa, fb = {"w": torch.tensor([3.0, 4.0]), "v": torch.tensor([0.0])}, {"w": torch.tensor([1.0, 0.0]),
                                                                          "v": torch.tensor([0.0])}
    m = Fisher(normalize=True, floor=1e-6).with_statistics(stats_of([fa, fb], counts=4.0))
    inputs = TensorInputs("w", None, [torch.zeros(2), torch.ones(2)], [0, 1], [1.0, 2.0])
    inv = [1 / (5.0 + 1e-6), 1 / (1.0 + 1e-6)]
    assert m.coefficients(inputs) == pytest.approx([1.0 * inv[0] / sum(inv), 2.0 * inv[1] / sum(inv)], rel=1e-12)


def test_validation():
    with pytest.raises(ConfigError, match="floor"):
        Fisher(floor=0.0)
    with pytest.raises(ConfigError, match="normalize"):
        Fisher(normalize="yes")
    with pytest.raises(ConfigError, match="regmean"):
        Fisher().with_statistics(MergeStatistics(kind="regmean", experts=["a"]))
    with pytest.raises(ConfigError, match="estimator"):
        FisherMergeCallback(["x"], estimator="exact")


class Softmax(nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.fc = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.mark.parametrize("estimator", ["empirical", "expected"])
def test_fishers_equal_the_analytic_squared_gradients(estimator):
    g = gen(1)
    base = Softmax(torch.randn(4, 3, generator=g))
    experts = [Softmax(base.fc.weight.detach() + 0.3 * torch.randn(4, 3, generator=g)) for _ in range(2)]
    data = {t: [{"x": torch.randn(5, 3, generator=g), "labels": torch.randint(0, 4, (5,), generator=g)}
                for _ in range(2)] for t in ("p", "q")}
    bank = ExpertBank.build(base, experts, adopt=False)
    stats = collect_fishers(bank, lambda p, b: functional_call(base, p, kwargs={"x": b["x"]}), data, ["p", "q"],
                            max_batches=2, estimator=estimator)
    for m, (e, t) in enumerate(zip(experts, ("p", "q"))):
        w = e.fc.weight.detach().double()
        total, count = torch.zeros_like(w), 0.0
        for b in data[t]:
            x, y = b["x"].double(), b["labels"]
            p = torch.softmax(x @ w.T, -1)
            if estimator == "empirical":  # ∂ mean CE / ∂W
                grad = (p - nn.functional.one_hot(y, 4).double()).T @ x / len(x)
                count += 1
            else:  # ∂ Σ_x Σ_y sqrt(p_y) log p_y / ∂W, sqrt(p) held fixed
                s = p.sqrt()
                coef = s - p * s.sum(-1, keepdim=True)
                grad = coef.T @ x
                count += len(x)
            total += grad ** 2
        assert stats.counts["fc.weight"][m] == count
        torch.testing.assert_close(stats.mean("fc.weight", m), total / count, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("normalize", [True, False])
def test_parity_with_fusionbench_fisher_merging(normalize):
    merge = reference(FISHER, "merging_with_fisher_weights", functions_only=True)
    g = gen(2)
    names = ["a.weight", "a.bias", "b.weight"]
    shapes = {"a.weight": (3, 4), "a.bias": (3,), "b.weight": (2, 3)}
    params = {n: [torch.randn(shapes[n], generator=g) for _ in range(3)] for n in names}
    fishers = [{n: torch.rand(shapes[n], generator=g) ** 2 for n in names} for _ in range(3)]
    coeffs = [0.2, 0.3, 0.5]
    ref = merge(params, fishers, torch.tensor(coeffs), normalize_fisher_weight=normalize, minimal_fisher_weight=1e-6)
    m = Fisher(normalize=normalize, floor=1e-6).with_statistics(stats_of(fishers, counts=3.0))
    for n in names:
        got = m.merge(TensorInputs(n, None, [t.clone() for t in params[n]], [0, 1, 2], coeffs))
        torch.testing.assert_close(got, ref[n], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, str]:
    return make_zoo(tmp_path_factory.mktemp("fisher_zoo"))


def full_experts(zoo) -> list[str]:
    return [zoo["e0"], zoo["e1"]]


def test_callback_collects_then_merges_and_saved_statistics_reproduce_it(zoo, tmp_path):
    out = tmp_path / "fisher.safetensors"
    cb = FisherMergeCallback(full_experts(zoo), calibration_batches=2, expert_tasks=["x", "y"],
                             statistics_out=str(out), target="model")
    module = LitClassifier()
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], limit_val_batches=1)).validate(module, datamodule=sens_data())
    assert cb.merged
    stats = MergeStatistics.load(out, kind="fisher")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert stats.counts[q] == {0: 2.0, 1: 2.0} and "model.embed_tokens.weight" in stats.sums
    got = module.model.state_dict()
    offline = merge_models(zoo["base"], full_experts(zoo), get_method("fisher", statistics=str(out)))
    assert all(torch.equal(got[k], v) for k, v in offline.items() if k in got)
    avg = merge_models(zoo["base"], full_experts(zoo), get_method("linear"))
    assert not torch.allclose(got[q], avg[q], atol=1e-5)


@pytest.mark.slow
def test_ddp_two_processes_equal_one(zoo, tmp_path):
    from safetensors.torch import load_file

    def run(d, **kw):
        d.mkdir()
        cb = FisherMergeCallback(full_experts(zoo), calibration_batches=2, expert_tasks=["x", "y"],
                                 statistics_out=str(d / "fisher.safetensors"), target="model")
        pl.Trainer(**trainer_kwargs(d, callbacks=[cb, DumpModel(str(d))], limit_val_batches=1, **kw)).validate(
            LitClassifier(), datamodule=sens_data())

    run(tmp_path / "one")
    run(tmp_path / "two", devices=2, strategy="ddp_spawn")
    s1, s2 = (MergeStatistics.load(tmp_path / d / "fisher.safetensors") for d in ("one", "two"))
    assert s1.counts == s2.counts
    for n in s1.sums:
        for e in s1.sums[n]:
            torch.testing.assert_close(s2.sums[n][e], s1.sums[n][e], rtol=1e-6, atol=1e-12)
    m1 = load_file(str(tmp_path / "one" / "model0.safetensors"))
    r0, r1 = (load_file(str(tmp_path / "two" / f"model{r}.safetensors")) for r in range(2))
    for k in m1:
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], m1[k], rtol=1e-5, atol=1e-6)
