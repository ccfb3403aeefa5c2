"""M-SMoE / MC-SMoE on tiny real transformers MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE).

A model whose 8 experts are 4 experts plus neuron-permuted copies (router rows duplicated) merges
back to the 4 originals exactly, permutations recovered, outputs unchanged; routing statistics from
the hooks equal the ones recomputed from the model's own router logits; merge weights follow
hand-built frequencies; compressed experts meet rank and sparsity with the error inside its bound;
HF folders round-trip through from_pretrained; the callback works in a real Trainer; bad input
gets ConfigErrors."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lightning_merge import ConfigError
from lightning_merge.moe import (
    MoEMergeCallback,
    RoutingStatistics,
    collect_routing,
    drop_experts,
    load_factors,
    low_rank_sparse,
    mcsmoe,
    mcsmoe_compress,
    moe_layers,
    msmoe_merge,
)
from lightning_merge.moe.arch import read_experts, write_experts
from lightning_merge.moe.tiny import make_recipe_moe, tiny_moe

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe"]


def batches(n: int = 3, b: int = 4, t: int = 10, vocab: int = 64, seed: int = 0, pad: bool = False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        if pad:
            mask[0, 6:] = 0
            mask[2, 3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.clone()})
    return out


def logits(model, data):
    with torch.no_grad():
        return torch.cat([model(input_ids=d["input_ids"], attention_mask=d["attention_mask"]).logits for d in data])


def duplicated(arch: str, seed: int = 0):
    """8 experts = 4 originals (slots 0-3) and permuted copies (slots 4-7), router rows duplicated."""
    model = tiny_moe(arch, seed=seed, num_experts=8, top_k=2)
    perms = {}
    g = torch.Generator().manual_seed(seed + 1)
    for layer in moe_layers(model):
        ex = read_experts(layer)
        p = [torch.randperm(ex[0].gate.shape[0], generator=g) for _ in range(4)]
        perms[layer.name] = p
        write_experts(layer, ex[:4] + [ex[j].permuted(p[j]) for j in range(4)])
        with torch.no_grad():
            layer.router.weight[4:] = layer.router.weight[:4]
    return model, perms


# ------------------------------------------------------------------ duplicates merge back exactly

def steered(model, data) -> RoutingStatistics:
    """Collected statistics with the copies' counts divided by 4: with exactly tied router rows a pair's
    frequencies tie, and this makes the originals (slots 0-3) the dominant experts."""
    stats = collect_routing(model, data)
    for n in stats.layers:
        assert torch.equal(stats.counts[n][:4], stats.counts[n][4:])  # every token picks both copies
        stats.counts[n][4:] /= 4
    return stats


@pytest.mark.parametrize("arch", ARCHS)
def test_duplicated_experts_merge_back_to_the_originals(arch):
    model, perms = duplicated(arch)
    originals = {x.name: read_experts(x)[:4] for x in moe_layers(model)}
    data = batches()
    before = logits(model, data)
    result = msmoe_merge(model, statistics=steered(model, data), num_experts=4, top_k=1)
    for layer, plan in zip(moe_layers(model), result.plans):
        assert plan.dominant == [0, 1, 2, 3] and plan.labels == [0, 1, 2, 3, 0, 1, 2, 3]
        assert plan.members == [[0, 4], [1, 5], [2, 6], [3, 7]]  # by router-logit similarity
        for j in range(4):  # aligned unit i = copy unit perm[i] = original unit p[perm[i]] = i
            perm = torch.tensor(plan.permutations[4 + j])
            assert torch.equal(perms[layer.name][j][perm], torch.arange(16))
            assert plan.weights[j] == pytest.approx([0.8, 0.2], abs=1e-12)
        merged = read_experts(layer)
        assert len(merged) == 4
        for m, o in zip(merged, originals[layer.name]):
            for k in ("gate", "up", "down"):
                torch.testing.assert_close(m.matrices()[k], o.matrices()[k], rtol=0, atol=1e-5)
        assert layer.num_experts == 4 and layer.top_k == 1
    assert result.config_updates["num_experts_per_tok"] == 1
    # top-2 over a duplicated pair == top-1 over the originals: the outputs are unchanged
    torch.testing.assert_close(logits(model, data), before, rtol=0, atol=1e-5)


def test_tied_layout_keeps_routing_and_outputs():
    model, _ = duplicated("mixtral")
    data = batches()
    before = logits(model, data)
    result = msmoe_merge(model, statistics=steered(model, data), num_experts=4, layout="tied")
    assert result.config_updates == {} and moe_layers(model)[0].num_experts == 8
    ex = read_experts(moe_layers(model)[0])
    for j in range(4):  # slot j + 4 holds its group's merged expert, the same as slot j
        assert torch.equal(ex[j].gate, ex[j + 4].gate) and torch.equal(ex[j].down, ex[j + 4].down)
    torch.testing.assert_close(logits(model, data), before, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="tied"):
        msmoe_merge(duplicated("mixtral")[0], data, num_experts=4, layout="tied", top_k=1)


def test_without_alignment_permuted_copies_do_not_merge_back():
    model, _ = duplicated("mixtral")
    orig = read_experts(moe_layers(model)[0])[0]
    msmoe_merge(model, statistics=steered(model, batches()), num_experts=4, top_k=1, align="none")
    merged = read_experts(moe_layers(model)[0])[0]
    assert (merged.gate - orig.gate).abs().max() > 0.05


# ------------------------------------------------------------------ routing statistics

def test_hook_statistics_equal_the_models_router_logits():
    model = tiny_moe("mixtral", num_experts=8, top_k=2)
    data = batches(pad=True)
    stats = collect_routing(model, data)
    with torch.no_grad():
        outs = [model(input_ids=d["input_ids"], attention_mask=d["attention_mask"], output_router_logits=True)
                for d in data]
    for li, name in enumerate(stats.layers):
        z = torch.cat([o.router_logits[li][d["attention_mask"].reshape(-1).bool()] for o, d in zip(outs, data)])
        z = z.double()
        top = torch.topk(torch.softmax(z, -1), 2, dim=-1).indices
        counts = torch.bincount(top.reshape(-1), minlength=8).double()
        assert torch.equal(stats.counts[name], counts)
        n_real = sum(int(d["attention_mask"].sum()) for d in data)
        assert stats.tokens[name] == n_real and float(stats.counts[name].sum()) == 2 * n_real
        torch.testing.assert_close(stats.gram[name], z.T @ z, rtol=1e-12, atol=1e-9)
        cos = torch.nn.functional.cosine_similarity(z[:, 1], z[:, 5], dim=0)
        assert float(stats.similarity(name)[1, 5]) == pytest.approx((float(cos) + 1) / 2, abs=1e-12)
        torch.testing.assert_close(stats.frequency(name), counts / counts.sum())
    # max_batches, padding kept, and the statistics file
    two = collect_routing(model, data, max_batches=2, ignore_padding=False)
    assert two.tokens[stats.layers[0]] == 2 * 4 * 10


def test_statistics_file_round_trip(tmp_path):
    model = tiny_moe("qwen3_moe")
    stats = collect_routing(model, batches(), keep_tokens=16)
    stats.save(tmp_path / "routing.safetensors")
    back = RoutingStatistics.load(tmp_path / "routing.safetensors")
    assert back.layers == stats.layers and back.tokens == stats.tokens and back.settings == stats.settings
    for n in stats.layers:
        assert torch.equal(back.counts[n], stats.counts[n]) and torch.equal(back.gram[n], stats.gram[n])
        assert back.kept[n].shape == (16, 32) and torch.equal(back.kept_index[n], stats.kept_index[n])
    with pytest.raises(ConfigError, match="not a routing statistics file"):
        RoutingStatistics.load(__file__)


def test_frequency_weights_follow_hand_built_routing():
    """Known counts -> f = counts / Σ; dominant = most used; W_g = Σ f_e W_e / Σ f_e by hand."""
    model = tiny_moe("mixtral", num_experts=4, top_k=2, layers=1)
    layer = moe_layers(model)[0]
    experts = read_experts(layer)
    stats = RoutingStatistics.empty([layer])
    stats.counts[layer.name] = torch.tensor([6.0, 1.0, 3.0, 0.0], dtype=torch.float64)
    stats.tokens[layer.name] = 5.0
    # logits where expert 1 follows expert 0 and expert 3 follows expert 2
    z = torch.tensor([[1.0, 2.0, -1.0, -2.0], [2.0, 4.1, 1.0, 1.9], [-1.0, -2.0, 3.0, 6.0]], dtype=torch.float64)
    stats.gram[layer.name] = z.T @ z
    router = layer.router.weight.detach().clone()
    result = msmoe_merge(model, statistics=stats, num_experts=2, align="none")
    plan = result.plans[0]
    assert plan.frequency == pytest.approx([0.6, 0.1, 0.3, 0.0])
    assert plan.dominant == [0, 2] and plan.labels == [0, 0, 1, 1]
    assert plan.weights == [pytest.approx([6 / 7, 1 / 7]), pytest.approx([1.0, 0.0])]
    merged = read_experts(layer)
    want = (6 * experts[0].gate + experts[1].gate) / 7
    torch.testing.assert_close(merged[0].gate, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged[1].down, experts[2].down, rtol=0, atol=1e-6)
    assert torch.equal(layer.router.weight.detach(), router[[0, 2]])  # the dominant experts' rows
    # uniform weighting: the plain mean of the same groups
    model2 = tiny_moe("mixtral", num_experts=4, top_k=2, layers=1)
    r2 = msmoe_merge(model2, statistics=stats, num_experts=2, align="none", weighting="uniform")
    assert r2.plans[0].weights == [[0.5, 0.5], [0.5, 0.5]]
    torch.testing.assert_close(read_experts(moe_layers(model2)[0])[0].up, (experts[0].up + experts[1].up) / 2,
                               rtol=0, atol=1e-6)


def test_drop_keeps_the_most_used_experts():
    model = tiny_moe("qwen2_moe", num_experts=6, top_k=2)
    shared = {k: v.clone() for k, v in model.state_dict().items() if "shared_expert" in k}
    stats = collect_routing(model, batches())
    before = {x.name: (read_experts(x), x.router.weight.detach().clone()) for x in moe_layers(model)}
    result = drop_experts(model, statistics=stats, num_experts=3)
    for layer, plan in zip(moe_layers(model), result.plans):
        keep = sorted(torch.argsort(stats.frequency(layer.name), descending=True)[:3].tolist())
        assert plan.dominant == keep
        ex, rows = before[layer.name]
        assert torch.equal(read_experts(layer)[1].gate, ex[keep[1]].gate)
        assert torch.equal(layer.router.weight.detach(), rows[keep])
    assert model.config.num_experts == 3
    for k, v in model.state_dict().items():
        if "shared_expert" in k:
            assert torch.equal(v, shared[k])


def test_activation_alignment_recovers_permutations():
    model, perms = duplicated("qwen3_moe")
    data = batches()
    stats = collect_routing(model, data, keep_tokens=64)
    stats.counts = {n: torch.cat([c[:4], c[4:] / 4]) for n, c in stats.counts.items()}
    result = msmoe_merge(model, statistics=stats, num_experts=4, top_k=1, align="activation")
    plan = result.plans[0]
    for j in range(4):
        p = torch.tensor(plan.permutations[4 + j])
        assert torch.equal(perms[plan.layer][j][p], torch.arange(16))


# ------------------------------------------------------------------ compression

def test_low_rank_sparse_meets_rank_sparsity_and_error_bound():
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    for sparsity in (0.0, 0.5, 0.75, 1.0):
        f = low_rank_sparse(w, 4, sparsity)
        assert f.rank == 4 and torch.linalg.matrix_rank(f.left @ f.right) == 4
        assert f.rows.numel() == int((1 - sparsity) * 24) and f.sparsity >= sparsity
        dense = f.dense()
        err = float((dense - w).norm() / w.norm())
        assert err == pytest.approx(f.error, abs=1e-6) and f.error <= f.bound + 1e-7
        s = dense - f.left @ f.right
        assert int((s.abs().sum(1) > 1e-4).sum()) <= f.rows.numel()
        assert f.params == 4 * (24 + 40) + f.rows.numel() * 40
    assert low_rank_sparse(w, 4, 0.0).error < 1e-6
    full = low_rank_sparse(w, 4, 1.0)
    sv = torch.linalg.svdvals(w.double())
    assert full.error == pytest.approx(float(sv[4:].pow(2).sum().sqrt() / sv.pow(2).sum().sqrt()), abs=1e-6)


def test_mcsmoe_compresses_every_merged_expert(tmp_path):
    model = tiny_moe("mixtral", num_experts=8, top_k=2)
    merged, comp = mcsmoe(model, batches(), num_experts=4, rank=4, sparsity=0.75, out_dir=tmp_path / "out")
    rep = comp.report()
    assert len(comp.factors) == 2 * 4 * 3 and rep["ratio"] < 1.0
    for f in comp.factors.values():
        assert f.rank == 4 and f.sparsity >= 0.75 and f.error <= f.bound + 1e-7 and f.error < 1.0
    layer = moe_layers(model)[0]
    f = comp.factors[(layer.name, 2, "down")]
    torch.testing.assert_close(read_experts(layer)[2].down, f.dense(), rtol=0, atol=1e-6)
    # the folder: dense reconstruction that loads, factors beside it, the report
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert back.config.num_local_experts == 4
    data = batches()
    torch.testing.assert_close(logits(back.eval(), data), logits(model, data), rtol=0, atol=1e-5)
    factors = load_factors(tmp_path / "out" / "mcsmoe_factors.safetensors")
    torch.testing.assert_close(factors[(layer.name, 2, "down")].dense(), f.dense(), rtol=0, atol=1e-6)
    report = json.loads((tmp_path / "out" / "moe_merge.json").read_text())
    assert report["settings"]["method"] == "msmoe" and report["compression"]["settings"]["rank"] == 4
    assert report["compression"]["max_relative_error"] == pytest.approx(rep["max_relative_error"])


# ------------------------------------------------------------------ HF round trip

@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_from_pretrained_round_trip_with_the_smaller_config(arch, tmp_path):
    model = tiny_moe(arch, num_experts=8, top_k=2)
    data = batches()
    result = msmoe_merge(model, data, num_experts=1, out_dir=tmp_path / "m")
    key = "num_local_experts" if arch == "mixtral" else "num_experts"
    assert result.config_updates == {key: 1, "num_experts_per_tok": 1}
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg[key] == 1 and cfg["num_experts_per_tok"] == 1
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert moe_layers(back)[0].experts.gate_up_proj.shape[0] == 1
    torch.testing.assert_close(logits(back, data), logits(model, data), rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="exists|not empty|overwrite"):
        msmoe_merge(tiny_moe(arch), data, num_experts=2, out_dir=tmp_path / "m")


# ------------------------------------------------------------------ errors

def test_clear_errors():
    data = batches()
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ConfigError, match="not a mixture-of-experts model"):
        msmoe_merge(llama, data, num_experts=2)
    model = tiny_moe("mixtral", num_experts=4)
    ref = read_experts(moe_layers(model)[0])[0].gate.clone()
    for n in (0, 5, 2.0):
        with pytest.raises(ConfigError, match="num_experts=.* out of range"):
            msmoe_merge(model, data, num_experts=n)
    with pytest.raises(ConfigError, match="no calibration data"):
        msmoe_merge(model, num_experts=2)
    with pytest.raises(ConfigError, match="no calibration data"):
        msmoe_merge(model, [], num_experts=2)
    with pytest.raises(ConfigError, match="top_k=3 is out of range"):
        msmoe_merge(model, data, num_experts=2, top_k=3)
    with pytest.raises(ConfigError, match="align"):
        msmoe_merge(model, data, num_experts=2, align="zipit")
    with pytest.raises(ConfigError, match="rank=0 is out of range"):
        mcsmoe_compress(model, rank=0, sparsity=0.5)
    with pytest.raises(ConfigError, match="sparsity=1.5 is out of range"):
        mcsmoe_compress(model, rank=2, sparsity=1.5)
    with pytest.raises(ConfigError, match="routing statistics are of blocks"):
        msmoe_merge(model, statistics=collect_routing(tiny_moe("mixtral", num_experts=8), data), num_experts=2)
    with pytest.raises(ConfigError, match="rank and sparsity"):
        MoEMergeCallback(2, rank=4)
    assert torch.equal(read_experts(moe_layers(model)[0])[0].gate, ref)  # nothing was changed


# ------------------------------------------------------------------ in a Trainer

class LitMoE(pl.LightningModule):
    def __init__(self, arch: str = "mixtral") -> None:
        super().__init__()
        self.model = tiny_moe(arch, head="classifier", num_labels=3, num_experts=8, top_k=2).train()
        g = torch.Generator().manual_seed(5)
        ids = torch.randint(1, 64, (48, 8), generator=g)
        self.rows = [{"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long),
                      "labels": ids[i, -1] % 3} for i in range(48)]

    def forward(self, **batch):
        return self.model(**batch)

    def training_step(self, batch, idx):
        return self.model(**batch).loss

    def validation_step(self, batch, idx):
        self.log("val/loss", self.model(**batch).loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.rows, batch_size=8)

    val_dataloader = train_dataloader


def trainer(tmp_path, **kw):
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kw)


def test_callback_merges_on_the_runs_own_data_in_validate_and_fit(tmp_path):
    lit = LitMoE()
    expected = collect_routing(LitMoE().model, lit.val_dataloader(), max_batches=4)
    cb = MoEMergeCallback(4, calibration_batches=4, rank=4, sparsity=0.5, out_dir=str(tmp_path / "out"),
                          statistics_out=str(tmp_path / "routing.safetensors"))
    trainer(tmp_path, callbacks=[cb], limit_val_batches=2).validate(lit)
    got = RoutingStatistics.load(tmp_path / "routing.safetensors")
    for n in expected.layers:
        assert torch.equal(got.counts[n], expected.counts[n])
    assert cb.result is not None and cb.compression is not None
    assert moe_layers(lit.model)[0].num_experts == 4 and lit.model.config.num_local_experts == 4
    from transformers import AutoModelForSequenceClassification

    back = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert back.config.num_local_experts == 4
    # fit: merged in setup, before the optimizer is built, so the smaller model trains
    lit2 = LitMoE()
    cb2 = MoEMergeCallback(2, method="average", calibration_batches=2)
    trainer(tmp_path, callbacks=[cb2], max_steps=2, limit_val_batches=1, num_sanity_val_steps=0).fit(lit2)
    assert moe_layers(lit2.model)[0].num_experts == 2 and cb2.result.settings["weighting"] == "uniform"
    assert cb2.result.settings["align"] == "none"


# ------------------------------------------------------------------ the recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "mcsmoe.yaml"


def test_recipe_print_config_is_a_fixed_point(tmp_path, monkeypatch, capsys):
    from lightning_merge.cli import main

    monkeypatch.chdir(tmp_path)
    make_recipe_moe(tmp_path / "out" / "recipes")
    assert main(["validate", "--config", str(RECIPE), "--print_config"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    assert main(["validate", "--config", str(tmp_path / "printed.yaml"), "--print_config"]) == 0
    assert capsys.readouterr().out == printed
    [cb] = yaml.safe_load(printed)["trainer"]["callbacks"]
    assert cb["class_path"] == "lightning_merge.moe.MoEMergeCallback"


def test_recipe_validate_merges_compresses_and_writes(tmp_path, monkeypatch):
    from test_learned_recipes import logged

    from lightning_merge.cli import main

    monkeypatch.chdir(tmp_path)
    make_recipe_moe(tmp_path / "out" / "recipes")
    assert main(["validate", "--config", str(RECIPE), "--trainer.limit_val_batches=1"]) == 0
    run = tmp_path / "out" / "recipes" / "runs" / "mcsmoe"
    m = logged(run)
    assert {"val/a/acc", "val/b/acc", "val/c/acc", "merge/time_s"} <= set(m) and m["merge/num_experts"] == 4
    from transformers import AutoModelForSequenceClassification

    back = AutoModelForSequenceClassification.from_pretrained(run / "merged")
    assert back.config.num_local_experts == 4 and back.config.num_experts_per_tok == 2
    report = json.loads((run / "merged" / "moe_merge.json").read_text())
    assert report["compression"]["settings"] == {"method": "mcsmoe", "rank": 8, "sparsity": 0.5}
    stats = RoutingStatistics.load(run / "routing.safetensors")
    assert stats.num_experts == 8 and stats.settings["max_batches"] == 4


# ------------------------------------------------------------------ DDP: 2 processes == 1 process

def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        stats = collect_routing(tiny_moe("mixtral"), batches(n=5, pad=True), keep_tokens=8)
        if rank == 0:
            stats.save(out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_equal_one(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp.safetensors"
    mp.spawn(_ddp_worker, args=(2, port, str(out)), nprocs=2, join=True)
    ddp = RoutingStatistics.load(out)
    one = collect_routing(tiny_moe("mixtral"), batches(n=5, pad=True), keep_tokens=8)
    for n in one.layers:
        assert torch.equal(ddp.counts[n], one.counts[n]) and ddp.tokens[n] == one.tokens[n]
        torch.testing.assert_close(ddp.gram[n], one.gram[n], rtol=1e-12, atol=1e-9)
        assert ddp.kept[n].shape == (8, 32)
