"""PLeaS (lightning_merge.pleas): exact recovery of permuted copies, least squares at full and partial
width, HF folders with the new intermediate_size, the data-free variant, the callback in a real
Trainer, the recipe, clear errors, and (slow) 2-process DDP statistics equal to one process."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_learned_helpers import DumpModel, trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_merge.errors import ConfigError
from lightning_merge.examples.make_recipe_models import tiny_config
from lightning_merge.pleas import FeatureStats, PLeaSMergeCallback, pleas_merge, pleas_merge_result, save_merged

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def mlp(seed: int, d_in: int = 8, hidden: int = 16, d_out: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, d_out))


def permuted_mlp(a: nn.Sequential, p1: torch.Tensor, p2: torch.Tensor) -> nn.Sequential:
    b = mlp(99)
    with torch.no_grad():
        b[0].weight.copy_(a[0].weight[p1])
        b[0].bias.copy_(a[0].bias[p1])
        b[2].weight.copy_(a[2].weight[p2][:, p1])
        b[2].bias.copy_(a[2].bias[p2])
        b[4].weight.copy_(a[4].weight[:, p2])
        b[4].bias.copy_(a[4].bias)
    return b


def inputs(n: int = 512, d: int = 8, seed: int = 0) -> list[torch.Tensor]:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return [x[i:i + 64] for i in range(0, n, 64)]


def llama(seed: int) -> nn.Module:
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    return LlamaForSequenceClassification(tiny_config(hidden_size=32)).eval()


def token_batches(n: int = 64, seq: int = 12) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(1, 128, (n, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[::3, -4:] = 0  # some padding: left out of the statistics
    return [{"input_ids": ids[i:i + 16], "attention_mask": mask[i:i + 16]} for i in range(0, n, 16)]


def permuted_llama(a: nn.Module, seed: int = 5) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A copy of ``a`` with its residual stream, key/value head groups and MLP units permuted."""
    g = torch.Generator().manual_seed(seed)
    cfg = a.config
    hd, rep = cfg.hidden_size // cfg.num_attention_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    res = torch.randperm(cfg.hidden_size, generator=g)
    sd = {k: v.clone() for k, v in a.state_dict().items()}
    perms = {"res": res}
    sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"][:, res]
    sd["model.norm.weight"] = sd["model.norm.weight"][res]
    sd["score.weight"] = sd["score.weight"][:, res]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        heads = torch.randperm(cfg.num_key_value_heads, generator=g)
        mid = torch.randperm(cfg.intermediate_size, generator=g)
        perms[f"heads{i}"], perms[f"inter{i}"] = heads, mid
        q_idx = (heads[:, None] * rep * hd + torch.arange(rep * hd)).reshape(-1)
        kv_idx = (heads[:, None] * hd + torch.arange(hd)).reshape(-1)
        for n in ("input_layernorm", "post_attention_layernorm"):
            sd[f"{p}.{n}.weight"] = sd[f"{p}.{n}.weight"][res]
        sd[f"{p}.self_attn.q_proj.weight"] = sd[f"{p}.self_attn.q_proj.weight"][q_idx][:, res]
        for n in ("k_proj", "v_proj"):
            sd[f"{p}.self_attn.{n}.weight"] = sd[f"{p}.self_attn.{n}.weight"][kv_idx][:, res]
        sd[f"{p}.self_attn.o_proj.weight"] = sd[f"{p}.self_attn.o_proj.weight"][res][:, q_idx]
        for n in ("gate_proj", "up_proj"):
            sd[f"{p}.mlp.{n}.weight"] = sd[f"{p}.mlp.{n}.weight"][mid][:, res]
        sd[f"{p}.mlp.down_proj.weight"] = sd[f"{p}.mlp.down_proj.weight"][res][:, mid]
    b = llama(123)
    b.load_state_dict(sd)
    return b, perms


# ----------------------------------------------------------------------------- exact recovery

def test_permuted_copy_is_recovered_exactly():
    a = mlp(0)
    g = torch.Generator().manual_seed(1)
    p1, p2 = torch.randperm(16, generator=g), torch.randperm(16, generator=g)
    b = permuted_mlp(a, p1, p2)
    r = pleas_merge_result(a, b, inputs(), width=1.0)
    # perm[i] is B's unit matched to A's unit i: B's unit j is A's unit p[j]
    assert torch.equal(r.permutations["hidden0"], torch.argsort(p1))
    assert torch.equal(r.permutations["hidden2"], torch.argsort(p2))
    assert r.widths["hidden0"] == r.widths["hidden2"] == 16
    for k, v in a.state_dict().items():
        torch.testing.assert_close(r.model.state_dict()[k], v, rtol=0, atol=1e-5)
    x = torch.cat(inputs(seed=3))
    torch.testing.assert_close(r.model(x), a(x), rtol=0, atol=1e-5)
    assert r.error < 1e-10


def test_permuted_llama_is_recovered_exactly():
    a = llama(0)
    b, perms = permuted_llama(a)
    r = pleas_merge_result(a, b, token_batches(), width=1.0)
    for g, p in perms.items():
        assert torch.equal(r.permutations[g], torch.argsort(p)), g
    batch = token_batches()[0]
    torch.testing.assert_close(r.model(**batch).logits, a(**batch).logits, rtol=0, atol=1e-5)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(r.model.state_dict()[k], v, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- least squares

def test_full_width_reproduces_each_model():
    """Different random inits, width 2.0 (no unit merged): the merged hidden features are A's and B's and
    the separate heads give each model's logits, exact up to float32 rounding (tolerance 1e-5)."""
    a, b = mlp(0), mlp(1)
    r = pleas_merge_result(a, b, inputs(), width=2.0, head="separate")
    assert r.widths["hidden0"] == r.widths["hidden2"] == 32 and r.widths["output"] == 6
    assert r.error < 1e-10
    x = torch.cat(inputs(seed=3))
    out = r.model(x)
    torch.testing.assert_close(out[:, :3], a(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[:, 3:], b(x), rtol=0, atol=1e-5)
    # the layout is [merged, A's separate, B's separate (in their partners' order)]: here [A's, B's matched order]
    perm = r.permutations["hidden0"]
    torch.testing.assert_close(r.model[:2](x), torch.cat([a[:2](x), b[:2](x)[:, perm]], 1), rtol=0, atol=1e-5)


def test_ls_error_decreases_with_width_and_beats_alignment_alone():
    a, b = mlp(0), mlp(1)
    data, x = inputs(), torch.cat(inputs(seed=3))
    errors, widths = [], [1.0, 1.25, 1.5, 1.75, 2.0]
    for w in widths:
        r = pleas_merge_result(a, b, data, width=w, head="separate")
        assert r.widths["hidden0"] == round(16 * w)
        errors.append(r.error)
        # the least squares beat the permute-and-average weights at the same width on held-out inputs
        perm = pleas_merge(a, b, data, width=w, head="separate", method="permute")
        target = torch.cat([a(x), b(x)], 1)
        ls_err = (r.model(x) - target).pow(2).mean()
        assert ls_err <= (perm(x) - target).pow(2).mean() + 1e-7
    assert all(e2 <= e1 + 1e-12 for e1, e2 in zip(errors, errors[1:])), errors
    assert errors[0] > 1e-3 and errors[-1] < 1e-10


def test_average_baseline_is_the_plain_mean():
    a, b = mlp(0), mlp(1)
    avg = pleas_merge(a, b, None, width=1.0, method="average")
    for k, v in avg.state_dict().items():
        torch.testing.assert_close(v, (a.state_dict()[k] + b.state_dict()[k]) / 2, rtol=0, atol=1e-7)


def test_matching_budget_keeps_the_total_width():
    a, b = mlp(0), mlp(1)
    uni = pleas_merge_result(a, b, inputs(), width=1.5)
    glob = pleas_merge_result(a, b, inputs(), width=1.5, budget="matching")
    assert glob.widths["hidden0"] + glob.widths["hidden2"] == uni.widths["hidden0"] + uni.widths["hidden2"] == 48
    per = pleas_merge_result(a, b, inputs(), width={"hidden0": 2.0, "hidden2": 1.0})
    assert (per.widths["hidden0"], per.widths["hidden2"]) == (32, 16)


# ----------------------------------------------------------------------------- HF folders, data-free

def test_hf_folder_round_trip_with_new_intermediate_size(tmp_path):
    from transformers import AutoModelForSequenceClassification

    a, b = llama(0), llama(1)
    r = pleas_merge_result(a, b, token_batches(), width=1.5)
    assert r.widths["inter0"] == r.widths["inter1"] == 96 and r.widths["res"] == 32
    out = save_merged(r.model, tmp_path / "merged")
    loaded = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert loaded.config.intermediate_size == 96 and loaded.config.hidden_size == 32
    assert loaded.model.layers[1].mlp.down_proj.weight.shape == (32, 96)
    assert loaded.model.layers[0].mlp.gate_proj.weight.shape == (96, 32)
    batch = token_batches()[1]
    torch.testing.assert_close(loaded(**batch).logits, r.model(**batch).logits, rtol=0, atol=1e-6)
    with pytest.raises(Exception, match="overwrite"):
        save_merged(r.model, tmp_path / "merged")


def test_data_free_variant_uses_generic_inputs():
    a, b = llama(0), llama(1)
    r = pleas_merge_result(a, b, None, width=1.25, data_free=True, calibration_batches=2)
    assert r.statistics is not None and r.statistics.settings["data_free"] is True
    assert r.widths["inter0"] == 80
    assert r.statistics.counts["attn0"] == 2 * 16 * 32  # 2 generic batches of 16 × 32 tokens
    m = pleas_merge(mlp(0), mlp(1), None, width=1.5, data_free=True, calibration_batches=4)
    assert m[0].out_features == 24
    # padding rows are left out of the statistics
    s = pleas_merge_result(a, b, token_batches(), width=1.0).statistics
    assert s.counts["attn0"] == sum(int(bt["attention_mask"].sum()) for bt in token_batches())


# ----------------------------------------------------------------------------- errors

def test_bad_inputs_raise_clear_errors():
    a, b = mlp(0), mlp(1)
    for w in (0.5, 2.5):
        with pytest.raises(ConfigError, match="width .* out of range"):
            pleas_merge(a, b, inputs(), width=w)
    with pytest.raises(ConfigError, match="architectures do not match"):
        pleas_merge(a, mlp(1, hidden=12), inputs())
    with pytest.raises(ConfigError, match="architectures do not match"):
        pleas_merge(llama(0), a, inputs())
    with pytest.raises(ConfigError, match="needs calibration data"):
        pleas_merge(a, b, None)
    with pytest.raises(ConfigError, match="no batch"):
        pleas_merge(a, b, [])
    with pytest.raises(ConfigError, match="BatchNorm1d"):
        bn = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        pleas_merge(bn, bn, inputs())
    with pytest.raises(ConfigError, match="not a supported architecture"):
        pleas_merge(nn.Conv1d(1, 1, 1), nn.Conv1d(1, 1, 1), inputs())
    with pytest.raises(ConfigError, match="budget='matching'"):
        pleas_merge(llama(0), llama(1), token_batches(), budget="matching")
    with pytest.raises(ConfigError, match="method"):
        pleas_merge(a, b, inputs(), method="ties")
    with pytest.raises(ConfigError, match="method='average' merges every unit"):
        pleas_merge(a, b, inputs(), method="average", width=1.5)
    with pytest.raises(ConfigError, match="other="):
        PLeaSMergeCallback("/nonexistent/model_b")


# ----------------------------------------------------------------------------- Lightning

class LitMLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = mlp(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def mlp_loader() -> DataLoader:
    x = torch.cat(inputs())
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (len(x),), generator=torch.Generator().manual_seed(0))),
                      batch_size=64)


def test_callback_in_trainer_validate(tmp_path):
    save_file(mlp(1).state_dict(), str(tmp_path / "b.safetensors"))
    cb = PLeaSMergeCallback(str(tmp_path / "b.safetensors"), width=1.5, calibration="val", calibration_batches=8,
                            output_dir=str(tmp_path / "merged.safetensors"))
    module = LitMLP()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], limit_val_batches=2))
    trainer.validate(module, dataloaders=mlp_loader())
    assert module.model[0].out_features == 24 and module.model[2].out_features == 24
    offline = pleas_merge(mlp(0), mlp(1), [x for x, _ in mlp_loader()], width=1.5, calibration_batches=8)
    for k, v in offline.state_dict().items():
        torch.testing.assert_close(module.model.state_dict()[k], v, rtol=0, atol=0)
    saved = load_file(str(tmp_path / "merged.safetensors"))
    assert saved["0.weight"].shape == (24, 8)
    # a second stage of the same run does not merge again
    trainer.validate(module, dataloaders=mlp_loader())
    assert module.model[0].out_features == 24
    # fit: the merge runs before the optimizer is built, which then trains the merged weights
    cb = PLeaSMergeCallback(str(tmp_path / "b.safetensors"), width=1.25, calibration="train", calibration_batches=2)
    module = LitMLP()
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], max_steps=1, limit_val_batches=0)).fit(
        module, train_dataloaders=mlp_loader())
    assert module.model[0].out_features == 20
    before = pleas_merge(mlp(0), mlp(1), [x for x, _ in mlp_loader()], width=1.25, calibration_batches=2)
    assert not torch.equal(module.model[0].weight, before[0].weight)  # one SGD step moved the merged weights


def test_callback_errors(tmp_path):
    save_file(mlp(1, hidden=12).state_dict(), str(tmp_path / "b.safetensors"))
    with pytest.raises(ConfigError, match="calibration"):
        PLeaSMergeCallback(str(tmp_path / "b.safetensors"), calibration="dev")
    with pytest.raises(ConfigError, match="width"):
        PLeaSMergeCallback(str(tmp_path / "b.safetensors"), width=3.0)
    cb = PLeaSMergeCallback(str(tmp_path / "b.safetensors"), calibration="val")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], limit_val_batches=1))
    with pytest.raises(ConfigError, match="architectures do not match"):
        trainer.validate(LitMLP(), dataloaders=mlp_loader())
    save_file(mlp(1).state_dict(), str(tmp_path / "b2.safetensors"))
    cb = PLeaSMergeCallback(str(tmp_path / "b2.safetensors"), calibration="test")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], limit_val_batches=1))
    with pytest.raises(ConfigError, match="no test dataloader"):
        trainer.validate(LitMLP(), dataloaders=mlp_loader())


def test_recipe_runs_and_writes_an_hf_folder(tmp_path, monkeypatch, capsys):
    from test_learned_recipes import logged
    from transformers import AutoModelForSequenceClassification

    from lightning_merge.cli import main
    from lightning_merge.examples.make_recipe_models import save_tiny_model

    # the recipe's two models, here from two different random initialisations (no shared base)
    for seed, name in ((0, "expert_a"), (1, "expert_b")):
        save_tiny_model(tmp_path / "out" / "recipes" / name, seed=seed)
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "--config", str(RECIPES / "pleas.yaml"), "--print_config"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    assert main(["validate", "--config", str(tmp_path / "printed.yaml"), "--print_config"]) == 0
    assert capsys.readouterr().out == printed
    assert main(["validate", "--config", str(RECIPES / "pleas.yaml"), "--trainer.limit_val_batches=1"]) == 0
    run = tmp_path / "out" / "recipes" / "runs" / "pleas"
    m = logged(run)
    assert {"val/a/acc", "val/b/acc", "val/c/acc", "merge/time_s", "merge/pleas_ls_error"} <= set(m)
    merged = AutoModelForSequenceClassification.from_pretrained(str(run / "merged"))
    assert merged.config.intermediate_size == 192
    assert merged.model.layers[0].mlp.up_proj.weight.shape == (192, 64)
    stats = FeatureStats.load(run / "pleas_stats.safetensors")
    assert stats.settings["max_batches"] == 4  # the first 4 batches of the one train loader


@pytest.mark.slow
def test_ddp_two_processes_equal_one(tmp_path):
    save_file(mlp(1).state_dict(), str(tmp_path / "b.safetensors"))

    def run(d: Path, **kw) -> None:
        d.mkdir()
        cb = PLeaSMergeCallback(str(tmp_path / "b.safetensors"), width=1.5, calibration="val", calibration_batches=8,
                                statistics_out=str(d / "stats.safetensors"))
        pl.Trainer(**trainer_kwargs(d, callbacks=[cb, DumpModel(str(d))], limit_val_batches=1, **kw)
                   ).validate(LitMLP(), dataloaders=mlp_loader())

    run(tmp_path / "one")
    run(tmp_path / "two", devices=2, strategy="ddp_spawn")
    s1, s2 = (FeatureStats.load(tmp_path / d / "stats.safetensors") for d in ("one", "two"))
    assert s1.counts == s2.counts == {"in0": 512.0, "in2": 512.0, "in4": 512.0}
    for site in s1.sums:
        torch.testing.assert_close(s2.sums[site], s1.sums[site], rtol=1e-12, atol=1e-12)
    m1 = load_file(str(tmp_path / "one" / "model0.safetensors"))
    r0, r1 = (load_file(str(tmp_path / "two" / f"model{r}.safetensors")) for r in range(2))
    for k in m1:
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], m1[k], rtol=1e-5, atol=1e-6)
