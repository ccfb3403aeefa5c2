"""RegMean and RegMean++: the closed form on hand-worked cases, Grams from hooks against explicit
XᵀX, RegMean++'s staged Grams by hand, saved statistics, FusionBench 0.2.33 parity, the callback
in a Trainer (offline merge from its saved statistics is identical) and 2-process DDP == 1 process."""

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
from lightning_merge.learned import ExpertBank, MergeStatistics, RegMean, RegMeanMergeCallback, collect_grams
from lightning_merge.learned.regmean import regmean_solve, scale_off_diagonal, weighted_average
from lightning_merge.methods import TensorInputs

REGMEAN = "fusion_bench/method/regmean/regmean.py"
REGMEAN_PP = "fusion_bench/method/regmean_plusplus/regmean_plusplus.py"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- the closed form by hand

def test_identity_grams_give_the_weighted_average():
    g = gen()
    ws = [torch.randn(3, 4, generator=g) for _ in range(3)]
    eye = [torch.eye(4, dtype=torch.float64) * 2.0 for _ in range(3)]  # equal scalings cancel
    got = regmean_solve(ws, eye, [1.0, 2.0, 1.0])
    torch.testing.assert_close(got, (ws[0] + 2 * ws[1] + ws[2]) / 4, rtol=0, atol=1e-6)
    torch.testing.assert_close(weighted_average(ws, [1.0, 2.0, 1.0]), got, rtol=0, atol=1e-6)


def test_one_expert_gives_that_expert():
    w = torch.randn(3, 4, generator=gen(1))
    x = torch.randn(10, 4, generator=gen(2), dtype=torch.float64)
    torch.testing.assert_close(regmean_solve([w], [x.T @ x], [0.7]), w, rtol=0, atol=1e-5)
    m = RegMean()
    assert torch.equal(m.merge(TensorInputs("fc.weight", None, [w], [0], [1.0])), w)


def test_alpha_zero_is_the_diagonal_gram_merge():
    g = gen(3)
    ws = [torch.randn(2, 5, generator=g) for _ in range(2)]
    xs = [torch.randn(7, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    grams = [x.T @ x for x in xs]
    got = regmean_solve(ws, grams, [1.0, 1.0], alpha=0.0)
    d = [torch.diag(torch.diagonal(gm)) for gm in grams]
    torch.testing.assert_close(got, regmean_solve(ws, d, [1.0, 1.0], alpha=1.0), rtol=0, atol=1e-6)
    # by hand: per input feature k, a diagonal-weighted mean of column k
    dk = [torch.diagonal(gm) for gm in grams]
    want = (ws[0].double() * dk[0] + ws[1].double() * dk[1]) / (dk[0] + dk[1])
    torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-6)
    half = scale_off_diagonal(grams[0], 0.5)
    assert torch.equal(torch.diagonal(half), torch.diagonal(grams[0]))
    torch.testing.assert_close(half.fill_diagonal_(0), 0.5 * grams[0].clone().fill_diagonal_(0))


def test_sum_grams_give_the_least_squares_fit_of_the_concatenated_tasks():
    """min_W Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖²: lstsq on [X_1; X_2] → [X_1 W_1ᵀ; X_2 W_2ᵀ]."""
    g = gen(4)
    xs = [torch.randn(n, 4, generator=g, dtype=torch.float64) for n in (9, 5)]
    ws = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    big_x = torch.cat(xs)
    big_y = torch.cat([x @ w.T for x, w in zip(xs, ws)])
    want = torch.linalg.lstsq(big_x, big_y).solution.T
    got = regmean_solve([w.float() for w in ws], [x.T @ x for x in xs], [1.0, 1.0])
    torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-5)
    # Conv1D layout ([in, out]): the same merge, transposed
    conv = regmean_solve([w.T.float() for w in ws], [x.T @ x for x in xs], [1.0, 1.0], transpose=False)
    torch.testing.assert_close(conv, want.T.float(), rtol=0, atol=1e-5)


def test_method_falls_back_to_the_average_and_validates():
    g = gen(5)
    ws = [torch.randn(4, generator=g) for _ in range(2)]  # a bias: no Gram
    stats = MergeStatistics(kind="regmean", experts=["a", "b"])
    m = RegMean().with_statistics(stats)
    got = m.merge(TensorInputs("fc.bias", None, [w.clone() for w in ws], [0, 1], [1.0, 3.0]))
    torch.testing.assert_close(got, (ws[0] + 3 * ws[1]) / 4, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="alpha"):
        RegMean(alpha=1.5)
    with pytest.raises(ConfigError, match="gram"):
        RegMean(gram="max")
    with pytest.raises(ConfigError, match="not a merge statistics file"):
        RegMean(statistics=__file__)
    with pytest.raises(ConfigError, match="fisher"):
        RegMean().with_statistics(MergeStatistics(kind="fisher", experts=["a"]))


# ---------------------------------------------------------------- statistics from hooks

class Tiny(nn.Module):
    """emb → fc1 → relu → fc2 (fc1: 4 → 5, fc2: 5 → 3)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(11, 4)
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.emb(input_ids))))


def tiny_setup():
    base = Tiny(0)
    experts = []
    for s in (1, 2):
        e = Tiny(0)
        with torch.no_grad():
            for p, q in zip(e.parameters(), Tiny(s).parameters()):
                p.add_(0.3 * q)
        experts.append(e)
    g = gen(6)
    data = {}
    for t in ("p", "q"):
        ids = torch.randint(0, 11, (2, 3, 6), generator=g)
        mask = torch.ones(2, 3, 6, dtype=torch.long)
        mask[:, 0, 4:] = 0  # padding rows: left out of the Grams
        data[t] = [{"input_ids": ids[b], "attention_mask": mask[b]} for b in range(2)]
    bank = ExpertBank.build(base, experts, adopt=False)

    def call(params, inputs):
        return functional_call(base, params, kwargs=dict(inputs))

    return base, experts, data, bank, call


def rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x[mask.bool()].double()


def test_hook_grams_equal_explicit_xtx():
    _, experts, data, bank, call = tiny_setup()
    stats = collect_grams(bank, call, data, ["p", "q"], max_batches=2)
    assert set(stats.sums) == {"fc1.weight", "fc2.weight"} and stats.transpose == {"fc1.weight": True,
                                                                                      "fc2.weight": True}
    for m, (e, t) in enumerate(zip(experts, ("p", "q"))):
        with torch.no_grad():
            h = [(rows(e.emb(b["input_ids"]), b["attention_mask"]),
                  rows(torch.relu(e.fc1(e.emb(b["input_ids"]))), b["attention_mask"])) for b in data[t]]
        x1, x2 = torch.cat([a for a, _ in h]), torch.cat([b for _, b in h])
        assert stats.counts["fc1.weight"][m] == 2 * 3 * 6 - 2 * 2
        torch.testing.assert_close(stats.sums["fc1.weight"][m], x1.T @ x1, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(stats.sums["fc2.weight"][m], x2.T @ x2, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(stats.gram("fc2.weight", m), x2.T @ x2 / len(x2), rtol=1e-10, atol=1e-12)
    one = collect_grams(bank, call, data, ["p", "q"], max_batches=1)
    assert one.counts["fc1.weight"][0] == 3 * 6 - 2


def test_plus_plus_grams_are_taken_on_the_partly_merged_model():
    _, experts, data, bank, call = tiny_setup()
    plain = collect_grams(bank, call, data, ["p", "q"], max_batches=2)
    pp = collect_grams(bank, call, data, ["p", "q"], max_batches=2, plus_plus=True, weights=[1.0, 2.0], alpha=0.8)
    # emb is merged first (the average), then fc1 from Grams on the merged emb, then fc2 on merged emb + fc1
    w = [1.0, 2.0]
    emb = weighted_average([e.emb.weight.detach() for e in experts], w)
    g1 = [pp.gram("fc1.weight", m) for m in range(2)]
    fc1_w = regmean_solve([e.fc1.weight.detach() for e in experts], g1, w, alpha=0.8)
    fc1_b = weighted_average([e.fc1.bias.detach() for e in experts], w)
    for m, t in enumerate(("p", "q")):
        x1 = torch.cat([rows(nn.functional.embedding(b["input_ids"], emb), b["attention_mask"]) for b in data[t]])
        torch.testing.assert_close(pp.sums["fc1.weight"][m], x1.T @ x1, rtol=1e-6, atol=1e-6)
        x2 = torch.cat([rows(torch.relu(nn.functional.linear(nn.functional.embedding(b["input_ids"], emb),
                                                             fc1_w, fc1_b)), b["attention_mask"]) for b in data[t]])
        torch.testing.assert_close(pp.sums["fc2.weight"][m], x2.T @ x2, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(pp.sums["fc2.weight"][0], plain.sums["fc2.weight"][0])
    assert pp.settings["plus_plus"] is True and pp.settings["weights"] == [1.0, 2.0]


def test_statistics_round_trip(tmp_path):
    _, _, data, bank, call = tiny_setup()
    stats = collect_grams(bank, call, data, ["p", "q"], max_batches=2)
    path = stats.save(tmp_path / "s.safetensors")
    back = MergeStatistics.load(path)
    assert back.kind == "regmean" and back.experts == stats.experts and back.counts == stats.counts
    assert back.transpose == stats.transpose and back.settings == stats.settings
    for n in stats.sums:
        for e in stats.sums[n]:
            assert torch.equal(back.sums[n][e], stats.sums[n][e]) and back.sums[n][e].dtype == torch.float64
    with pytest.raises(ConfigError, match="fisher"):
        MergeStatistics.load(path, kind="fisher")
    m = get_method("regmean", statistics=str(path), alpha=0.9)
    with pytest.raises(ConfigError, match="2 experts"):
        m.check_experts(3)


# ---------------------------------------------------------------- FusionBench parity

@pytest.mark.parametrize("alpha", [1.0, 0.6, 0.0])
def test_parity_with_fusionbench_regmean(alpha):
    merge = reference(REGMEAN, "merging_with_regmean_weights", functions_only=True)
    pp_merge = reference(REGMEAN_PP, "regmean_params_merge", functions_only=True)
    g = gen(7)
    ws = [torch.randn(3, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    bias = [torch.randn(3, generator=g, dtype=torch.float64) for _ in range(3)]
    xs = [torch.randn(20, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    grams = [x.T @ x / len(x) for x in xs]
    ref = merge({"fc.weight": ws, "fc.bias": bias}, [{"fc": gm} for gm in grams], reduce_non_diagonal_ratio=alpha)
    stats = MergeStatistics(kind="regmean", experts=["a", "b", "c"], transpose={"fc.weight": True})
    for e, x in enumerate(xs):
        stats.add("fc.weight", e, x.T @ x, len(x))
    m = RegMean(alpha=alpha).with_statistics(stats)
    got = m.merge(TensorInputs("fc.weight", None, [w.float() for w in ws], [0, 1, 2], [1.0, 1.0, 1.0]))
    torch.testing.assert_close(got, ref["fc.weight"].float(), rtol=1e-5, atol=1e-5)
    got_b = m.merge(TensorInputs("fc.bias", None, [b.float() for b in bias], [0, 1, 2], [1.0, 1.0, 1.0]))
    torch.testing.assert_close(got_b, ref["fc.bias"].float(), rtol=1e-6, atol=1e-6)
    ref_pp = pp_merge(ws, grams, reduce_non_diagonal_ratio=alpha)
    torch.testing.assert_close(got, ref_pp.float(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- in a Trainer

@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, str]:
    return make_zoo(tmp_path_factory.mktemp("regmean_zoo"))


def full_experts(zoo) -> list[str]:
    return [zoo["e0"], zoo["e1"]]


@pytest.mark.parametrize("plus_plus", [False, True])
def test_callback_collects_then_merges_and_saved_statistics_reproduce_it(zoo, tmp_path, plus_plus):
    out = tmp_path / "stats.safetensors"
    cb = RegMeanMergeCallback(full_experts(zoo), alpha=0.9, plus_plus=plus_plus, calibration_batches=2,
                              expert_tasks=["x", "y"], statistics_out=str(out), target="model")
    module = LitClassifier()
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], limit_val_batches=1)).validate(module, datamodule=sens_data())
    assert cb.merged and out.is_file()
    stats = MergeStatistics.load(out)
    assert stats.settings["plus_plus"] is plus_plus
    q = "model.layers.1.self_attn.q_proj.weight"
    assert q in stats.sums and stats.counts[q][0] == 2 * 8 * 6  # 2 batches of 8 × 6 tokens
    assert "model.embed_tokens.weight" not in stats.sums  # not a linear layer: averaged
    got = module.model.state_dict()
    offline = merge_models(zoo["base"], full_experts(zoo), RegMean(statistics=str(out), alpha=0.9))
    assert all(torch.equal(got[k], v) for k, v in offline.items() if k in got)
    avg = merge_models(zoo["base"], full_experts(zoo), get_method("linear"))
    assert not torch.allclose(got[q], avg[q], atol=1e-4)  # a linear layer: not the average
    norm = "model.layers.0.input_layernorm.weight"
    torch.testing.assert_close(got[norm], avg[norm], rtol=0, atol=1e-6)  # the rest: the average
    # reused in a second run: no collection, the same merge
    cb2 = RegMeanMergeCallback(full_experts(zoo), alpha=0.9, statistics=str(out), target="model")
    module2 = LitClassifier()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb2], limit_val_batches=1))
    trainer.validate(module2, datamodule=sens_data())
    assert all(torch.equal(module2.model.state_dict()[k], v) for k, v in got.items())


def test_callback_configuration_errors(zoo, tmp_path):
    with pytest.raises(ConfigError, match="calibration_batches"):
        RegMeanMergeCallback(full_experts(zoo), calibration_batches=0)
    with pytest.raises(ConfigError, match="expert_tasks"):
        RegMeanMergeCallback(full_experts(zoo), expert_tasks=["x"])
    with pytest.raises(ConfigError, match="method"):
        RegMeanMergeCallback(full_experts(zoo), method="ties")
    with pytest.raises(ConfigError, match="alpha"):
        RegMeanMergeCallback(full_experts(zoo), alpha=-0.1)


@pytest.mark.slow
@pytest.mark.parametrize("plus_plus", [False, True])
def test_ddp_two_processes_equal_one(zoo, tmp_path, plus_plus):
    from safetensors.torch import load_file

    def run(d, **kw):
        d.mkdir()
        cb = RegMeanMergeCallback(full_experts(zoo), alpha=0.9, plus_plus=plus_plus, calibration_batches=2,
                                  expert_tasks=["x", "y"], statistics_out=str(d / "stats.safetensors"),
                                  target="model")
        pl.Trainer(**trainer_kwargs(d, callbacks=[cb, DumpModel(str(d))], limit_val_batches=1, **kw)
                   ).validate(LitClassifier(), datamodule=sens_data())

    run(tmp_path / "one")
    run(tmp_path / "two", devices=2, strategy="ddp_spawn")
    s1, s2 = (MergeStatistics.load(tmp_path / d / "stats.safetensors") for d in ("one", "two"))
    assert s1.counts == s2.counts
    for n in s1.sums:
        for e in s1.sums[n]:
            torch.testing.assert_close(s2.sums[n][e], s1.sums[n][e], rtol=1e-12, atol=1e-12)
    m1 = load_file(str(tmp_path / "one" / "model0.safetensors"))
    r0, r1 = (load_file(str(tmp_path / "two" / f"model{r}.safetensors")) for r in range(2))
    for k in m1:
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], m1[k], rtol=1e-5, atol=1e-6)
