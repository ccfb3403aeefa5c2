"""``LearnedMerge`` (AdaMerging / DAM as a LightningModule): the spec's DAM vectors exactly,
gradients to the coefficients only, task arithmetic as a special case, export == wrapper,
entropy going down, checkpoint resume, and configuration errors before any training."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_learned_helpers import classifier, make_zoo, token_batches, trainer_kwargs
from torch import nn

from lightning_merge import ConfigError, TaskArithmetic, merge_models
from lightning_merge.learned import LearnedMerge, dam_kl, l1_penalty, l2_penalty, similarity_penalty


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, str]:
    return make_zoo(tmp_path_factory.mktemp("learned_zoo"))


def experts(zoo) -> list[str]:
    return [zoo["e0"], zoo["e1"], zoo["lora"]]


def fit(module: pl.LightningModule, tmp_path: Path, loader=None, **kw) -> pl.Trainer:
    t = pl.Trainer(**trainer_kwargs(tmp_path, **kw))
    t.fit(module, loader if loader is not None else token_batches())
    return t


# ------------------------------------------------------------------------------ spec §11.8 vectors

class Lin(nn.Module):
    """y = W x (no bias): the spec's DAM linear vector as a model."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def test_dam_linear_vector_exact(vectors):
    v = vectors["dam_linear"]
    zero = {"proj.weight": torch.zeros(2, 3)}
    ws = [{"proj.weight": torch.tensor(w)} for w in (v["W1"], v["W2"])]
    m = LearnedMerge(Lin(), ws, base=zero, granularity="column", target="")
    with torch.no_grad():
        m.coefficients.values["proj::weight"].copy_(torch.tensor([v["c1"], v["c2"]]))
    merged = m.merged_params()["proj.weight"]
    assert torch.equal(merged, torch.tensor(v["W_merged"]))
    y = m(x=torch.tensor([v["x"]]))
    assert torch.equal(y[0], torch.tensor(v["y"]))
    exported = m.export(None)
    assert torch.equal(exported["proj.weight"], torch.tensor(v["W_merged"]))


def test_dam_loss_vectors(vectors):
    kl = vectors["dam_kl"]
    merged = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]], dtype=torch.float64)
    expert = torch.tensor([[[1.0, 1.0, -2.0], [0.0, 2.0, 0.0]]], dtype=torch.float64)
    ref = dam_kl(merged, expert, temperature=kl["T"], normalization="reference")
    assert float(ref) == pytest.approx(kl["reference_value_batchmean_times_T2_div_tokens"], rel=1e-6)
    per_tok = dam_kl(merged, expert, temperature=kl["T"], normalization="per_token")
    assert float(per_tok) * 2 / kl["T"] ** 2 == pytest.approx(kl["sum_over_tokens_KL"], rel=1e-6)
    # a pad token contributes nothing and is not counted
    padded = torch.cat([merged, merged[:, :1] * 0], 1)
    mask = torch.tensor([[True, True, False]])
    assert float(dam_kl(padded, torch.cat([expert, expert[:, :1]], 1), mask, temperature=2.0)) == pytest.approx(
        float(ref), rel=1e-9)
    c = torch.tensor([vectors["dam_linear"]["c1"], vectors["dam_linear"]["c2"]], dtype=torch.float64)
    assert 0.01 * float(similarity_penalty([c])) == pytest.approx(vectors["dam_similarity_loss_lambda0.01"], rel=1e-9)
    assert 1e-6 * float(l1_penalty([c])) == pytest.approx(vectors["dam_l1_l2_1e-6"]["l1"], rel=1e-9)
    assert 1e-6 * float(l2_penalty([c])) == pytest.approx(vectors["dam_l1_l2_1e-6"]["l2_norm_not_squared"], rel=1e-9)


def test_dam_gradient_check_only_similarity_remains(vectors):
    """Expert logits equal to the merged logits: KL = 0 and ∂loss/∂c = λ_sim ∂cos/∂c."""
    v = vectors["dam_linear"]
    c = torch.tensor([v["c1"], v["c2"]], dtype=torch.float64, requires_grad=True)
    z = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]], dtype=torch.float64) * c.sum()
    loss = dam_kl(z, z.detach()) + 0.01 * similarity_penalty([c])
    assert float(dam_kl(z.detach(), z.detach())) == pytest.approx(0.0, abs=1e-12)
    (g,) = torch.autograd.grad(loss, c)
    (g_sim,) = torch.autograd.grad(0.01 * similarity_penalty([c]), c)
    assert torch.allclose(g, g_sim, atol=1e-12)


# ------------------------------------------------------------------------------ the wrapper

def test_only_coefficients_train_everything_else_unchanged(zoo, tmp_path):
    m = LearnedMerge(zoo["base"], experts(zoo), granularity="tensor", lr=0.05)
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["coefficients.values.lambda"]
    assert not m.bank.loaded and not list(m.bank.buffers())  # the experts are read when the trainer sets up
    buffers = {k: v.clone() for k, v in m.load_bank().named_buffers()}
    frozen = {k: v.clone() for k, v in m.model.state_dict().items()}
    before = m.coefficients.values["lambda"].detach().clone()
    seen: list[list[str]] = []

    class Grads(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append([n for n, p in pl_module.named_parameters() if p.grad is not None])

    fit(m, tmp_path, callbacks=[Grads()])
    assert seen and all(s == ["coefficients.values.lambda"] for s in seen)
    assert not torch.equal(m.coefficients.values["lambda"], before)
    assert all(torch.equal(v, frozen[k]) for k, v in m.model.state_dict().items())
    assert all(torch.equal(v, buffers[k]) for k, v in m.bank.named_buffers())
    # the LoRA adapter only stores q/v deltas; full experts store what they changed
    assert all("q_proj" in n or "v_proj" in n for n in m.bank.names if 2 in m.bank.present[n])


@pytest.mark.parametrize("c", [0.5, 0.3])
def test_task_granularity_is_task_arithmetic(zoo, c):
    m = LearnedMerge(zoo["base"], experts(zoo), granularity="task", init=c)
    ours = m.export(None)
    ta = merge_models(zoo["base"], experts(zoo), TaskArithmetic(lambda_=c))
    for k, v in ta.items():
        if c == 0.5:  # power of two: the same float32 operations in the same order
            assert torch.equal(ours[k], v), k
        else:
            assert torch.allclose(ours[k], v, atol=1e-6, rtol=0), k


@pytest.mark.parametrize("granularity,kw", [("tensor", {}), ("column", {"include_base": True, "merge_norms": True}),
                                            ("task", {"coefficient_fn": "softmax"})])
def test_export_equals_wrapper(zoo, tmp_path, granularity, kw):
    from transformers import AutoModelForSequenceClassification

    m = LearnedMerge(zoo["base"], experts(zoo), granularity=granularity, objective="entropy", lr=0.05,
                     storage_dtype="bfloat16" if granularity == "tensor" else "float32", **kw)
    fit(m, tmp_path)
    out = m.export(tmp_path / "merged")
    plain = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    batch = next(iter(token_batches()))
    with torch.no_grad():
        want = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    table = json.loads((out / "learned_coefficients" / "coefficients.json").read_text())
    assert table["granularity"] == granularity and len(table["models"]) == m.coefficients.n_models
    assert (out / "learned_coefficients" / "coefficients.safetensors").is_file()
    assert (out / "learned_coefficients" / "coefficients.png").read_bytes()[:4] == b"\x89PNG"


def test_bf16_storage_halves_the_deltas(zoo):
    a = LearnedMerge(zoo["base"], experts(zoo), storage_dtype="float32")
    b = LearnedMerge(zoo["base"], experts(zoo), storage_dtype="bfloat16")
    assert b.bank.nbytes()["deltas"] * 2 == a.bank.nbytes()["deltas"]
    assert all(t.dtype == torch.float32 for t in b.merged_params().values())


def test_entropy_decreases_on_a_constructed_case(tmp_path):
    """Base: a zero classifier head (uniform predictions, H = log 4); expert: a sharp head. Raising
    λ sharpens the predictions, so AdaMerging must lower the entropy from λ = 0.3."""
    base = classifier(0)
    with torch.no_grad():
        base.score.weight.zero_()
    expert = classifier(0)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        expert.score.weight.copy_(3.0 * torch.randn(expert.score.weight.shape, generator=gen))
    m = LearnedMerge(base, [expert], granularity="tensor", lr=0.05)
    batch = next(iter(token_batches()))

    def current() -> float:
        with torch.no_grad():
            return float(m.objective_loss({k: v for k, v in batch.items() if k != "labels"}))

    start = current()
    fit(m, tmp_path, loader=token_batches(), max_epochs=10)
    assert current() < start - 0.05
    assert float(m.coefficients.effective("score.weight")[0].detach()) > 0.3


def test_dam_objective_trains_column_coefficients(zoo, tmp_path):
    from lightning_merge.learned import PerTaskTokensDataModule

    m = LearnedMerge(zoo["base"], experts(zoo), granularity="column", objective="dam", lr=0.01)
    dm = PerTaskTokensDataModule(vocab_size=64, seq_len=6, n_train=16, n_val=8, num_labels=4, tasks=["x", "y", "z"],
                                 batch_size=8)
    before = {k: v.detach().clone() for k, v in m.coefficients.values.items()}
    t = pl.Trainer(**trainer_kwargs(tmp_path))
    t.fit(m, datamodule=dm)
    assert m.expert_tasks == ["x", "y", "z"]
    changed = [k for k, v in m.coefficients.values.items() if not torch.equal(v, before[k])]
    assert any("q_proj" in k for k in changed) and "train/dam" in t.callback_metrics
    assert not any("embed" in k or "norm" in k for k in m.coefficients.values)  # not trained by default


def test_checkpoint_resume_matches_uninterrupted(zoo, tmp_path):
    def run(max_epochs: int, ckpt=None, root="a") -> tuple[LearnedMerge, ModelCheckpoint]:
        m = LearnedMerge(zoo["base"], experts(zoo), granularity="tensor", lr=0.05)
        cb = ModelCheckpoint(dirpath=tmp_path / root, save_last=True)
        t = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=max_epochs, enable_checkpointing=True, callbacks=[cb]))
        t.fit(m, token_batches(), ckpt_path=ckpt)
        return m, cb

    full, _ = run(2, root="full")
    part, cb = run(1, root="part")
    ckpt = torch.load(cb.last_model_path, weights_only=False)
    assert set(ckpt["state_dict"]) == {"coefficients.values.lambda"}  # the base and experts are re-read
    resumed, _ = run(2, ckpt=cb.last_model_path, root="part")
    assert torch.equal(resumed.coefficients.values["lambda"], full.coefficients.values["lambda"])
    other = LearnedMerge(zoo["base"], experts(zoo), granularity="task")
    with pytest.raises(ConfigError, match="granularity"):
        other.on_load_checkpoint(ckpt)


@pytest.mark.parametrize("kwargs,match", [
    ({"granularity": "row"}, "granularity"),
    ({"objective": "mse"}, "objective"),
    ({"coefficient_fn": "tanh", "init": 1.5}, "init"),
    ({"coefficient_fn": "sigmoid", "init": 0.0}, "init"),
    ({"clamp": [1.0, 0.0]}, "clamp"),
    ({"coefficient_fn": "softmax", "init": 0.5}, "init"),
    ({"include_base": True}, "include_base"),
    ({"granularity": "task", "merge_norms": True}, "merge_norms"),
    ({"temperature": 0.0}, "temperature"),
    ({"lr": -1.0}, "lr"),
    ({"similarity_weight": float("nan")}, "similarity_weight"),
    ({"storage_dtype": "int8"}, "storage_dtype"),
    ({"expert_tasks": ["a"]}, "expert_tasks"),
    ({"model_class": "NoSuchModel"}, "model_class"),
    ({"target": "nope"}, "target"),
])
def test_bad_configuration_raises_before_training(zoo, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LearnedMerge(zoo["base"], experts(zoo), **kwargs)


def test_bad_paths_and_dam_task_mapping(zoo, tmp_path):
    with pytest.raises(ConfigError, match=r"experts\[1\]"):
        LearnedMerge(zoo["base"], [zoo["e0"], str(tmp_path / "missing")])
    with pytest.raises(ConfigError, match="model"):
        LearnedMerge(str(tmp_path), experts(zoo))
    with pytest.raises(ConfigError, match="experts"):
        LearnedMerge(zoo["base"], [])
    m = LearnedMerge(zoo["base"], experts(zoo), objective="dam", expert_tasks=["a", "b", "q"])
    from lightning_merge.learned import PerTaskTokensDataModule

    dm = PerTaskTokensDataModule(vocab_size=64, seq_len=6, n_train=8, n_val=8, num_labels=4, tasks=["a", "b", "c"])
    with pytest.raises(ConfigError, match="expert_tasks"):
        pl.Trainer(**trainer_kwargs(tmp_path)).fit(m, datamodule=dm)


def test_combine_backward_matches_autograd():
    from lightning_merge.learned import combine

    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen).bfloat16()]
    offset = torch.randn(4, 5, generator=gen)
    c = torch.randn(2, 1, 5, generator=gen, requires_grad=True)
    g = torch.randn(4, 5, generator=gen)
    (ours,) = torch.autograd.grad((combine(c, parts, offset) * g).sum(), c)
    naive = offset + sum(c[k] * p.float() for k, p in enumerate(parts))
    (want,) = torch.autograd.grad((naive * g).sum(), c)
    assert torch.allclose(ours, want, atol=1e-6)


def test_causal_lm_with_tied_embeddings(tmp_path):
    """Per-token logits with padding, a tied lm_head merged once, export == wrapper."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**TINY_LM, tie_word_embeddings=True)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    ex = []
    for _ in range(2):
        m = LlamaForCausalLM(cfg)
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn(p.shape))
        ex.append(m)
    lm = LearnedMerge(str(tmp_path / "base"), ex, granularity="column", merge_embeddings=True, lr=0.05)
    names = [lm.prefix + n for n in lm.bank.names]  # the tied head is the embedding, merged once
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    ids = torch.randint(1, 64, (4, 6))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    loader = torch.utils.data.DataLoader(
        [{"input_ids": i, "attention_mask": a} for i, a in zip(ids, mask)], batch_size=2)
    fit(lm, tmp_path, loader=loader)
    out = lm.export(tmp_path / "merged")
    plain = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        want = lm(input_ids=ids, attention_mask=mask).logits
        got = plain(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()


TINY_LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=64, max_position_embeddings=64)


def test_export_refuses_to_touch_an_input_and_appears_whole(zoo, tmp_path):
    from lightning_merge.errors import OutputError

    m = LearnedMerge(zoo["base"], experts(zoo), granularity="task", objective="entropy")
    for target in (zoo["base"], zoo["e0"], Path(zoo["lora"]) / "sub", Path(zoo["e1"]).parent):
        before = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(zoo["e0"]).rglob("*"))
        with pytest.raises(OutputError, match="would destroy the input"):
            m.export(target, overwrite=True)
        assert sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(zoo["e0"]).rglob("*")) == before
    out = m.export(tmp_path / "merged")  # model, coefficients and plot appear in one rename
    assert {"learned_coefficients", "config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert {"coefficients.json", "coefficients.safetensors", "coefficients.png"} <= {
        p.name for p in (out / "learned_coefficients").iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
