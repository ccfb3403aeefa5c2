"""``LearnedMerge(folder)`` builds the model on the meta device and reads its weights when it is set
up: after the read the model is exactly ``from_pretrained``'s (state dict, buffers, ties, config),
a fit gives exactly the coefficients of a fit on a model loaded beforehand, and a folder the
skeleton cannot reproduce (a head its checkpoint lacks, weights that are not safetensors, a
``from_pretrained`` argument) is loaded whole in ``__init__`` as before, with one INFO line.
The 2-rank case (each rank reads only its shards' rows) is in tests/test_learned_sharded.py."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from test_learned_helpers import make_zoo, token_batches, trainer_kwargs
from torch import nn

from lightning_merge.learned import LearnedMerge
from lightning_merge.sources.base import ModuleSource

TINY_LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=64, max_position_embeddings=64, tie_word_embeddings=True)
CONFIG_LOG = "lightning_merge.learned.config"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, str]:
    return make_zoo(tmp_path_factory.mktemp("meta_zoo"))


def experts(zoo) -> list[str]:
    return [zoo["e0"], zoo["e1"], zoo["lora"]]


@pytest.fixture(scope="module")
def causal(tmp_path_factory) -> Path:
    """base/ (a causal LM with tied embeddings: its checkpoint has no lm_head.weight), e0/, e1/."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("meta_causal")
    cfg = LlamaConfig(**TINY_LM)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()
    base.save_pretrained(root / "base")
    gen = torch.Generator().manual_seed(1)
    for i in range(2):
        m = LlamaForCausalLM(cfg)
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
        m.save_pretrained(root / f"e{i}")
    return root


def assert_same_model(got: nn.Module, want: nn.Module) -> None:
    """Bit for bit the same model: state dict (names, dtypes, values), every buffer (persistent
    or not), the same tied parameters, the config, eval mode."""
    a, b = got.state_dict(), want.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].device == b[k].device and torch.equal(a[k], b[k]), k
    bufs = dict(want.named_buffers())
    assert [n for n, _ in got.named_buffers()] == list(bufs)
    assert all(torch.equal(v, bufs[n]) and v.dtype == bufs[n].dtype for n, v in got.named_buffers())
    assert ModuleSource(got).aliases == ModuleSource(want).aliases
    assert got.config.to_dict() == want.config.to_dict()
    assert got.config._attn_implementation == want.config._attn_implementation
    assert not got.training and not want.training


def info_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == CONFIG_LOG and r.levelno == logging.INFO]


@pytest.mark.parametrize("model_class", ["auto", "AutoModelForSequenceClassification"])
def test_folder_is_a_meta_skeleton_until_read(zoo, caplog, model_class):
    from transformers import LlamaForSequenceClassification

    caplog.set_level(logging.INFO, logger=CONFIG_LOG)
    lm = LearnedMerge(zoo["base"], experts(zoo), granularity="tensor", model_class=model_class)
    assert type(lm.model) is LlamaForSequenceClassification
    assert info_lines(caplog) == []  # not loaded whole
    assert all(p.is_meta for p in lm.model.parameters()) and len(list(lm.model.parameters())) == 21
    ref = LlamaForSequenceClassification.from_pretrained(zoo["base"], dtype=torch.float32)
    bufs = dict(ref.named_buffers())  # rotary inv_freq: computed in __init__, real from the start
    assert set(bufs) == {n for n, _ in lm.model.named_buffers()}
    assert all(not b.is_meta and torch.equal(b, bufs[n]) for n, b in lm.model.named_buffers())
    assert not lm.bank.loaded and lm.coefficients.values["lambda"].shape == (3, 21)
    lm.cpu()  # a move before the read (e.g. Lightning's teardown after an early failure) leaves it on meta
    assert all(p.is_meta for p in lm.model.parameters())
    lm.load_bank()
    assert all(p.device == torch.device("cpu") for p in lm.model.parameters())
    assert_same_model(lm.model, ref)
    assert [n for n, p in lm.named_parameters() if p.requires_grad] == ["coefficients.values.lambda"]


def test_tied_causal_lm_is_read_at_first_use_and_stays_tied(causal):
    from transformers import LlamaForCausalLM

    lm = LearnedMerge(str(causal / "base"), [str(causal / "e0"), str(causal / "e1")], granularity="column",
                      merge_embeddings=True)
    head, emb = lm.model.lm_head.weight, lm.model.model.embed_tokens.weight
    assert head is emb and head.is_meta
    merged = lm.merged_params()  # first use outside a trainer: the weights are read now
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    assert not lm.model.lm_head.weight.is_meta
    ref = LlamaForCausalLM.from_pretrained(causal / "base", dtype=torch.float32)
    assert_same_model(lm.model, ref)
    assert lm.model.generation_config.to_dict() == ref.generation_config.to_dict()
    assert "lm_head.weight" not in merged and "model.embed_tokens.weight" in merged


@pytest.mark.parametrize("granularity,objective", [("column", "entropy"), ("tensor", "task")])
def test_fit_equals_a_fit_on_the_loaded_model(zoo, tmp_path, granularity, objective):
    import lightning.pytorch as pl
    from transformers import LlamaForSequenceClassification

    kw = dict(granularity=granularity, objective=objective, lr=0.05)
    loaded = LlamaForSequenceClassification.from_pretrained(zoo["base"], dtype=torch.float32)
    runs = {}
    for name, model in (("folder", zoo["base"]), ("module", loaded)):
        torch.manual_seed(0)
        lm = LearnedMerge(model, experts(zoo), **kw)
        pl.Trainer(**trainer_kwargs(tmp_path / name, max_epochs=2)).fit(lm, token_batches())
        runs[name] = lm
    a, b = runs["folder"].coefficients.values, runs["module"].coefficients.values
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert max((v - v.flatten()[0]).abs().max().item() for v in a.values()) > 1e-3  # it trained
    ea, eb = runs["folder"].export(None, plot=False), runs["module"].export(None, plot=False)
    assert list(ea) == list(eb) and all(torch.equal(ea[k], eb[k]) for k in ea)


def test_checkpoint_without_the_head_is_loaded_whole_in_init(causal, caplog):
    """A classification head the causal-LM checkpoint lacks: from_pretrained in __init__ as
    before (the same random head for the same seed), with one INFO line naming the missing key."""
    from transformers import AutoModelForSequenceClassification

    caplog.set_level(logging.INFO, logger=CONFIG_LOG)
    torch.manual_seed(3)
    lm = LearnedMerge(str(causal / "base"), [str(causal / "e0"), str(causal / "e1")], target="model",
                      model_class="AutoModelForSequenceClassification", model_kwargs={"num_labels": 4})
    (line,) = info_lines(caplog)
    assert "loaded whole in __init__" in line and "'score.weight' is not in the checkpoint" in line
    assert not any(p.is_meta for p in lm.model.parameters())
    torch.manual_seed(3)
    ref = AutoModelForSequenceClassification.from_pretrained(causal / "base", num_labels=4, dtype=torch.float32)
    assert_same_model(lm.model, ref)
    assert lm.model.score.weight.shape == (4, 32)


def _bin_folder(zoo, tmp_path: Path) -> str:
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(Path(zoo["base"]) / "config.json", folder / "config.json")
    from safetensors.torch import load_file

    torch.save(load_file(str(Path(zoo["base"]) / "model.safetensors")), folder / "pytorch_model.bin")
    return str(folder)


@pytest.mark.parametrize("case,why", [
    ("bin", "its weights are not safetensors"),
    ("loader_kwarg", "model_kwargs ['ignore_mismatched_sizes'] are from_pretrained arguments"),
])
def test_folders_the_skeleton_cannot_reproduce_are_loaded_whole(zoo, tmp_path, caplog, case, why):
    from transformers import LlamaForSequenceClassification

    caplog.set_level(logging.INFO, logger=CONFIG_LOG)
    path = _bin_folder(zoo, tmp_path) if case == "bin" else zoo["base"]
    kwargs = {"ignore_mismatched_sizes": True} if case == "loader_kwarg" else {}
    lm = LearnedMerge(path, experts(zoo), model_kwargs=kwargs)
    (line,) = info_lines(caplog)
    assert why in line, line
    assert not any(p.is_meta for p in lm.model.parameters())
    assert_same_model(lm.model, LlamaForSequenceClassification.from_pretrained(path, dtype=torch.float32, **kwargs))
