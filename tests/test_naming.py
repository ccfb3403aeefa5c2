"""The naming module: structure read from tensor names (one home for every reader)."""

from __future__ import annotations

import pytest

from lightning_merge.naming import (
    is_embedding_module,
    is_input_embedding,
    is_pre_layer,
    is_tied_head,
    is_vocab_tensor,
    layer_of,
    tensor_groups,
    tied_head_alias,
)


@pytest.mark.parametrize("name, want", [
    ("model.layers.12.mlp.up_proj.weight", ("model.layers", 12, "mlp.up_proj.weight")),
    ("transformer.h.0.attn.c_attn.bias", ("transformer.h", 0, "attn.c_attn.bias")),
    ("encoder.layer.3.attention.self.query.weight", ("encoder.layer", 3, "attention.self.query.weight")),
    ("model.embed_tokens.weight", None),
    ("lm_head.weight", None),
])
def test_layer_of(name, want):
    assert layer_of(name) == want


@pytest.mark.parametrize("name, vocab, embedding, head, pre", [
    ("model.embed_tokens.weight", True, True, False, True),
    ("transformer.wte.weight", True, True, False, True),
    ("bert.embeddings.word_embeddings.weight", True, True, False, True),
    ("bert.embeddings.position_embeddings.weight", False, False, False, True),
    ("transformer.wpe.weight", False, False, False, True),
    ("lm_head.weight", True, False, True, False),
    ("embed_out.weight", True, False, True, False),
    ("output.weight", True, False, False, False),
    ("cls.predictions.bias", True, False, False, False),
    ("model.norm.weight", False, False, False, False),
    ("model.layers.0.self_attn.o_proj.weight", False, False, False, False),
    ("model.layers.0.attention.output.weight", False, False, False, False),
])
def test_embeddings_and_heads(name, vocab, embedding, head, pre):
    assert (is_vocab_tensor(name), is_input_embedding(name), is_tied_head(name), is_pre_layer(name)) == (
        vocab, embedding, head, pre)


def test_embedding_modules_and_tied_alias():
    assert is_embedding_module("model.embed_tokens") and is_embedding_module("transformer.wpe")
    assert not is_embedding_module("model.layers.0.mlp.up_proj")
    assert tied_head_alias(["model.embed_tokens.weight", "model.norm.weight"]) == {
        "lm_head.weight": "model.embed_tokens.weight"}
    assert tied_head_alias(["model.embed_tokens.weight", "lm_head.weight"]) == {}
    assert tied_head_alias(["a.wte.weight", "b.embed_tokens.weight"]) == {}  # ambiguous: no alias


def test_tensor_groups():
    names = ["model.layers.1.a.weight", "model.layers.2.a.weight", "model.layers.5.b.weight",
             "model.embed_tokens.weight"]
    assert tensor_groups(names) == "model.layers 1-2, 5; model.embed_tokens"
