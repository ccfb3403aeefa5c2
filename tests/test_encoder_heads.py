"""EncoderClassifier's heads from every accepted form: the save_heads file, a .pt file, a dict of
nn.Linear and a state dict give the same heads (issue 17)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_merge.errors import ConfigError
from lightning_merge.examples.encoder import EncoderClassifier, load_heads, save_heads


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("encoder")
    BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(root)
    return root


def _heads() -> dict[str, nn.Linear]:
    torch.manual_seed(1)
    return {"sentiment": nn.Linear(16, 2), "topic": nn.Linear(16, 4)}


def _same(a: dict[str, nn.Linear], b: dict[str, nn.Linear]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k].weight, b[k].weight) and torch.equal(a[k].bias, b[k].bias), k


def test_every_heads_form_gives_the_same_heads(encoder_dir, tmp_path):
    heads = _heads()
    save_heads(tmp_path / "heads.safetensors", heads)
    state = {f"{t}.{p}": getattr(lin, p).detach().clone() for t, lin in heads.items() for p in ("weight", "bias")}
    torch.save(state, tmp_path / "heads.pt")
    want = load_heads(tmp_path / "heads.safetensors")
    _same(want, heads)
    for spec in (tmp_path / "heads.pt", state, heads):
        _same(load_heads(spec), want)
    model = EncoderClassifier(str(encoder_dir), state)
    _same(dict(model.heads.items()), want)


def test_bad_heads_name_the_problem(encoder_dir, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_heads(tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="'sentiment' is neither a head"):
        load_heads({"sentiment": torch.zeros(2, 16)})
    with pytest.raises(ConfigError, match="head 'topic' takes 8 inputs"):
        EncoderClassifier(str(encoder_dir), {"topic": nn.Linear(8, 4)})
