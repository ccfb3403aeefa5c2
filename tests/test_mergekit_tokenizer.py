"""mergekit's tokenizer forms (``tokenizer_source``, ``tokenizer:``, ``chat_template``) in
``lightning-merge merge``: the output vocabulary, embedding rows re-indexed per model, padding,
chat templates and the errors, and (parity) the same tensors, vocabulary, ``vocab_size`` and chat
template as mergekit 0.1.5 on tiny Llama models with real word-level tokenizers whose
vocabularies differ (added tokens, another order, a missing word, a new word).

The parity cases avoid what mergekit leaves to chance: it visits the models in Python-set order
and a vocabulary in hash-map order, so the ids of tokens new to the base vary between its runs
when several models or several plain tokens bring them, and ``chat_template: auto`` breaks ties
that way too. Here each new plain token comes from one model, the added tokens appear in the same
order in every model that has them and ``auto`` has a plurality.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_merge.errors import ConfigError
from lightning_merge.mergekit import parse_config

WORDS = [f"w{i}" for i in range(12)]
SPECIALS = ["<unk>", "<s>", "</s>"]
T_A = "{% for m in messages %}{{ m['content'] }} /A {% endfor %}"
T_B = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} /B {% endfor %}"
EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _tokenizer(words, added=()):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(SPECIALS + list(words))}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if added:
        tok.add_tokens(list(added))
    return tok


def _save(folder: Path, tok, seed: int, template: str | None = None, tokenizer: bool = True) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         tie_word_embeddings=False))
    model.save_pretrained(folder)
    if tokenizer:
        if template:
            tok.chat_template = template
        tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """base: the 12 words; e1: + added <x1>; e2: the words reversed without w3, a new plain word w12,
    added <x1>, <x2>; e3: the base's vocabulary; notok: the base's vocabulary, no tokenizer files."""
    root = tmp_path_factory.mktemp("tok_zoo")
    rev = [w for w in reversed(WORDS) if w != "w3"] + ["w12"]
    _save(root / "base", _tokenizer(WORDS), 0, T_A)
    _save(root / "e1", _tokenizer(WORDS, ["<x1>"]), 1, T_A)
    _save(root / "e2", _tokenizer(rev, ["<x1>", "<x2>"]), 2, T_B)
    _save(root / "e3", _tokenizer(WORDS), 3)
    _save(root / "notok", _tokenizer(WORDS), 4, tokenizer=False)
    return root


def config(zoo: Path, method: str = "task_arithmetic", models=("e1", "e2"), base: str | None = "base",
           weights=(0.7, 0.4), **extra) -> dict:
    c = {"merge_method": method, "models": [{"model": str(zoo / m), "parameters": {"weight": w}}
                                            for m, w in zip(models, weights, strict=True)]}
    if base is not None:
        c["base_model"] = str(zoo / base)
    return {**c, **extra}


def read(out: Path) -> dict:
    import json

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    return {"tensors": {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()},
            "vocab": tok.get_vocab(), "template": tok.chat_template,
            "vocab_size": json.loads((out / "config.json").read_text())["vocab_size"]}


def ours(cfg: dict, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    parse_config(cfg).merge(out)
    return read(out)


def mergekit(cfg: dict, out: Path) -> dict:
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    shutil.rmtree(out, ignore_errors=True)
    run_merge(MergeConfiguration.model_validate(cfg), str(out),
              options=MergeOptions(device="cpu", quiet=True, write_model_card=False))
    return read(out)


def rows(zoo: Path, name: str, key: str = EMB) -> dict[str, torch.Tensor]:
    """Model ``name``'s rows by token."""
    from transformers import AutoTokenizer

    folder = zoo / name
    t = load_file(folder / "model.safetensors")[key]
    vocab = AutoTokenizer.from_pretrained(folder if name != "notok" else zoo / "base").get_vocab()
    return {tok: t[i] for tok, i in vocab.items()}


def ordered(vocab: dict[str, int]) -> list[str]:
    return [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]


# ------------------------------------------------------------------------------------- our behaviour

def test_union_vocabulary_and_rows(zoo, tmp_path):
    """union: the base's tokens, then the new plain word, then the added tokens; every output row
    is the weighted mean (linear) of each model's row for that token, the defaults for the models
    that lack it: <x2> only in e2 -> e2's row; <x1> in e1 and e2 -> their mean; w3 (not in e2) ->
    the base's row, as base_model has it."""
    w = {"base": 1.0, "e1": 2.0, "e2": 3.0}
    got = ours(config(zoo, "linear", models=tuple(w), weights=tuple(w.values()), tokenizer_source="union"),
               tmp_path / "out")
    assert ordered(got["vocab"]) == SPECIALS + WORDS + ["w12", "<x1>", "<x2>"]
    assert got["vocab_size"] == 18 and got["template"] == T_A
    for key in (EMB, HEAD):
        r = {m: rows(zoo, m, key) for m in w}
        for tok, i in got["vocab"].items():
            have = {m: r[m][tok] for m in w if tok in r[m]}
            if tok in r["base"]:
                default = r["base"][tok]
            else:
                default = sum(have.values()) / len(have)
            want = sum(w[m] * have.get(m, default) for m in w) / sum(w.values())
            torch.testing.assert_close(got["tensors"][key][i], want, rtol=0, atol=1e-6, msg=f"{key} {tok}")


def test_pad_to_multiple_of_rows_are_the_mean_and_the_model_loads(zoo, tmp_path):
    from transformers import LlamaForCausalLM

    cfg = config(zoo, "linear", models=("base", "e1", "e2"), weights=(1.0, 1.0, 1.0),
                 tokenizer={"source": "union", "pad_to_multiple_of": 8})
    got = ours(cfg, tmp_path / "out")
    assert got["vocab_size"] == 24 and len(got["vocab"]) == 18
    for key in (EMB, HEAD):
        t = got["tensors"][key]
        assert t.shape == (24, 16)
        torch.testing.assert_close(t[18:], t[:18].mean(0).expand(6, 16), rtol=0, atol=1e-6)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert model.get_input_embeddings().weight.shape == (24, 16)
    assert model(torch.tensor([[1, 17, 23]])).logits.shape == (1, 3, 24)


def test_model_source_and_token_settings(zoo, tmp_path):
    """tokenizer_source: e2 (its vocabulary and chat template); token settings: a forced model
    row, a model_token by name and by id, a forced zero. task_arithmetic over rows that every
    model takes from the same source gives that source row."""
    cfg = config(zoo, tokenizer={"source": str(zoo / "e2"), "tokens": {
        "w4": {"source": str(zoo / "e1"), "force": True},
        "w5": {"source": {"kind": "zero"}, "force": True},
        "w6": {"source": {"kind": "model_token", "model": str(zoo / "base"), "token_id": 4}, "force": True},
        "<new>": {"source": {"kind": "model_token", "model": str(zoo / "e1"), "token": "<x1>"}},
    }})
    got = ours(cfg, tmp_path / "out")
    from transformers import AutoTokenizer

    e2 = AutoTokenizer.from_pretrained(zoo / "e2").get_vocab()
    assert ordered(got["vocab"]) == ordered(e2) + ["<new>"] and got["template"] == T_B
    v, t = got["vocab"], got["tensors"][EMB]
    assert torch.equal(t[v["w5"]], torch.zeros(16))
    torch.testing.assert_close(t[v["w4"]], rows(zoo, "e1")["w4"], rtol=0, atol=1e-6)
    torch.testing.assert_close(t[v["w6"]], load_file(zoo / "base" / "model.safetensors")[EMB][4], rtol=0, atol=1e-6)
    torch.testing.assert_close(t[v["<new>"]], rows(zoo, "e1")["<x1>"], rtol=0, atol=1e-6)


def test_setting_without_source_follows_the_automatic_rule(zoo, tmp_path):
    """``w3: {force: true}``: every model takes the base's w3 row (e2 lacks w3; base_model has it),
    so task_arithmetic gives the base's row. (mergekit 0.1.5 raises NotImplementedError here.)"""
    got = ours(config(zoo, tokenizer={"source": "base", "tokens": {"w3": {"force": True}}}), tmp_path / "out")
    torch.testing.assert_close(got["tensors"][EMB][got["vocab"]["w3"]], rows(zoo, "base")["w3"], rtol=0, atol=1e-6)


@pytest.mark.parity
def test_base_source_with_a_new_token(zoo, tmp_path):
    """``source: base`` with a token the base lacks: the token is appended and every model takes the
    zero row. mergekit 0.1.5 adds it to the base tokenizer object itself, so the base's
    permutation loses that id and it fails with a KeyError."""
    cfg = config(zoo, tokenizer={"source": "base", "tokens": {"<new>": {"source": {"kind": "zero"}}}})
    got = ours(cfg, tmp_path / "ours")
    assert ordered(got["vocab"]) == SPECIALS + WORDS + ["<new>"] and got["vocab_size"] == 16
    assert torch.equal(got["tensors"][EMB][15], torch.zeros(16))
    pytest.importorskip("mergekit")
    with pytest.raises(KeyError):
        mergekit(cfg, tmp_path / "mk")


def test_expert_without_tokenizer_is_read_with_the_base_vocabulary(zoo, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lightning_merge.mergekit.tokenizer_build"):
        got = ours(config(zoo, models=("e2", "notok"), tokenizer_source="union"), tmp_path / "out")
    assert "has no tokenizer files" in caplog.text and "notok" in caplog.text
    torch.testing.assert_close(got["tensors"][EMB][got["vocab"]["w3"]],
                               rows(zoo, "base")["w3"] + 0.4 * (rows(zoo, "notok")["w3"] - rows(zoo, "base")["w3"]),
                               rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------- parity (mergekit)

def _tokens_case(zoo: Path) -> dict:
    return config(zoo, tokenizer={"source": "union", "pad_to_multiple_of": 8, "tokens": {
        "w3": {"source": str(zoo / "e1"), "force": True},
        "<x1>": {"source": {"kind": "model_token", "model": str(zoo / "e2"), "token": "w5"}},
        "<x2>": {"source": {"kind": "zero"}, "force": True},
        "w0": {"source": {"kind": "model_token", "model": str(zoo / "base"), "token_id": 4}, "force": True},
        "<new>": {"source": {"kind": "model_token", "model": str(zoo / "e1"), "token": "<x1>"}},
    }}, chat_template="chatml")


CASES = {
    "union+auto": lambda z: config(z, "linear", models=("base", "e1", "e2"), weights=(1.0, 2.0, 3.0),
                                   tokenizer_source="union", chat_template="auto"),
    "model-source": lambda z: config(z, tokenizer_source=str(z / "e2")),
    "base-source-ties": lambda z: config(z, "ties", tokenizer_source="base"),
    "tokens+pad+chatml": _tokens_case,
    "expert-without-tokenizer": lambda z: config(z, models=("e2", "notok"), tokenizer={"source": "union"}),
    "chat-template-only": lambda z: config(z, models=("e3",), weights=(0.5,), chat_template=T_B),
}


@pytest.mark.parity
@pytest.mark.parametrize("case", list(CASES))
def test_same_as_mergekit(zoo, tmp_path, case):
    cfg = CASES[case](zoo)
    want = mergekit(cfg, tmp_path / "mk")
    got = ours(cfg, tmp_path / "ours")
    assert got["vocab"] == want["vocab"]
    assert got["vocab_size"] == want["vocab_size"]
    assert got["template"] == want["template"]
    assert set(got["tensors"]) == set(want["tensors"])
    for k, v in want["tensors"].items():
        torch.testing.assert_close(got["tensors"][k], v, rtol=0, atol=1e-6, msg=k)


# --------------------------------------------------------------------------------------------- errors

def _fake(**extra) -> dict:
    c = {"merge_method": "ties", "base_model": "b", "models": [{"model": "e0"}, {"model": "e1"}]}
    return {**c, **extra}


@pytest.mark.parametrize(
    "cfg, match",
    [
        (_fake(tokenizer_source="union", tokenizer={"source": "union"}), "not both"),
        (_fake(tokenizer="union"), "tokenizer: expected a mapping"),
        (_fake(tokenizer={"tokenz": {}}), r"tokenizer\.tokenz: unknown key"),
        (_fake(tokenizer_source=5), "tokenizer_source: expected 'base', 'union' or a model path"),
        *[(_fake(tokenizer={"pad_to_multiple_of": p}), r"tokenizer\.pad_to_multiple_of: expected a positive")
          for p in (0, -8, "8", True, 2.5)],
        (_fake(tokenizer={"tokens": ["<a>"]}), r"tokenizer\.tokens: expected a mapping"),
        (_fake(tokenizer={"tokens": {"<a>": {"source": "other"}}}),
         r"tokenizer\.tokens\.<a>\.source: 'other' is not one of the merged models"),
        (_fake(tokenizer={"tokens": {"<a>": {"source": {"kind": "mean"}}}}), r"kind: 'mean'"),
        (_fake(tokenizer={"tokens": {"<a>": {"source": {"kind": "model_token", "model": "e0", "token": "x",
                                                          "token_id": 1}}}}), "exactly one of 'token' and"),
        (_fake(tokenizer={"tokens": {"<a>": {"source": {"kind": "model_token", "token": "x"}}}}), "needs 'model'"),
        (_fake(tokenizer={"tokens": {"<a>": {"source": {"kind": "model_token", "model": "e0", "token_id": -1}}}}),
         "token_id: expected a non-negative"),
        (_fake(tokenizer={"tokens": {"<a>": {"force": "yes"}}}), r"<a>\.force: expected true or false"),
        (_fake(tokenizer={"tokens": {"<a>": {"sourc": "e0"}}}), r"<a>\.sourc: unknown key"),
        (_fake(chat_template="x"), "chat_template: 'x' is neither"),
        (_fake(chat_template="nosuch_template"), "chat_template"),
        (_fake(chat_template=5), "chat_template: expected"),
    ],
)
def test_config_errors(cfg, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(cfg)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda z: config(z, base="notok", tokenizer_source="union"), "base_model '.*notok' has no tokenizer files"),
        (lambda z: config(z, tokenizer_source=str(z / "notok")), "tokenizer_source: '.*notok' has no tokenizer"),
        (lambda z: config(z, tokenizer={"tokens": {"w3": {"source": str(z / "e2")}}}),
         r"tokenizer\.tokens\.w3\.source: '.*e2' has no token 'w3'"),
        (lambda z: config(z, tokenizer={"tokens": {"<a>": {"source": {
            "kind": "model_token", "model": str(z / "e1"), "token": "nope"}}}}), r"'nope' is not in the vocabulary"),
        (lambda z: config(z, tokenizer={"tokens": {"<a>": {"source": {
            "kind": "model_token", "model": str(z / "e1"), "token_id": 16}}}}), r"token_id: 16 is out of range"),
        (lambda z: config(z, base="notok", models=("e3",), weights=(1.0,), chat_template=T_A),
         "chat_template: '.*notok' has no tokenizer files"),
    ],
)
def test_errors_before_anything_is_written(zoo, tmp_path, make, match):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=match):
        parse_config(make(zoo)).merge(out)
    assert not out.exists()


def test_cli_with_paths_relative_to_the_yaml(zoo, tmp_path):
    """``lightning-merge merge``: model paths in the tokenizer keys are read relative to the YAML's folder."""
    import yaml

    from lightning_merge.cli import main

    cfg = config(zoo, tokenizer={"source": "e2", "tokens": {"<new>": {"source": {"kind": "zero"}}}},
                 chat_template=T_A)
    cfg = {**cfg, "base_model": "base", "models": [{"model": "e1"}, {"model": "e2"}]}
    path = zoo / "relative.yml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["merge", str(path), str(out), "--no-progress"]) == 0
    got = read(out)
    assert len(got["vocab"]) == 18 and got["vocab"]["<new>"] == 17 and got["template"] == T_A
    assert got["vocab_size"] == 18 and torch.equal(got["tensors"][EMB][17], torch.zeros(16))
