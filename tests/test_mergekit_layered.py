"""Layer-range ``slices:`` (frankenmerges, per-slice merges): renumbered layers, the written
config, errors naming the slice, and (parity extra) the same tensors as mergekit 0.1.5."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lightning_merge.cli import main
from lightning_merge.errors import ConfigError
from lightning_merge.mergekit import parse_config
from lightning_merge.mergekit.layered import LayeredRecipe, renumbered

LAYERS = 4


def _model(family: str, layer_types=None):
    import transformers

    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False)
    if family == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(layer_types=layer_types, **kw))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))


def _zoo(root: Path, family: str) -> Path:
    torch.manual_seed(0)
    base = _model(family)
    base.save_pretrained(root / "base")
    gen = torch.Generator().manual_seed(1)
    for i, types in enumerate([None, ["full_attention"] * 2 + ["sliding_attention"] * 2]):
        m = _model(family, types)
        m.load_state_dict({k: v + 0.01 * (i + 1) * torch.randn(v.shape, generator=gen)
                           for k, v in base.state_dict().items()})
        m.save_pretrained(root / f"e{i}")
    return root


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """A base and two fine-tunes (Qwen2, 4 layers; e1 has sliding-attention layers 2-3)."""
    return _zoo(tmp_path_factory.mktemp("layered_qwen2"), "qwen2")


@pytest.fixture(scope="module")
def llama_zoo(tmp_path_factory) -> Path:
    """The same with Llama, whose config has no per-layer list (mergekit writes a loadable config)."""
    return _zoo(tmp_path_factory.mktemp("layered_llama"), "llama")


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def ours(config: dict, out: Path) -> dict[str, torch.Tensor]:
    cfg = out.with_suffix(".yaml")
    cfg.write_text(yaml.safe_dump(config))
    shutil.rmtree(out, ignore_errors=True)
    assert main(["merge", str(cfg), str(out), "--no-progress"]) == 0
    return tensors(out)


def frankenmerge(root: Path) -> dict:
    """The usual passthrough frankenmerge: layers 0-2 of e0, then layers 1-3 of e1."""
    return {"slices": [{"sources": [{"model": str(root / "e0"), "layer_range": [0, 3]}]},
                       {"sources": [{"model": str(root / "e1"), "layer_range": [1, 4]}]}],
            "merge_method": "passthrough", "dtype": "float32"}


def sliced_merges(root: Path) -> dict:
    """Per-slice SLERP: base/e0 layers 0-1 with a t gradient over the slice, then base/e1 layers 2-3
    with a slice-level t."""
    b, e0, e1 = (str(root / n) for n in ("base", "e0", "e1"))
    return {"slices": [
        {"sources": [{"model": b, "layer_range": [0, 2]}, {"model": e0, "layer_range": [0, 2]}],
         "parameters": {"t": [0.2, 0.9]}},
        {"sources": [{"model": b, "layer_range": [2, 4]}, {"model": e1, "layer_range": [2, 4]}],
         "parameters": {"t": 0.3}},
    ], "merge_method": "slerp", "base_model": b, "parameters": {"t": 0.5}, "dtype": "float32"}


def ties_slices(root: Path) -> dict:
    b, e0, e1 = (str(root / n) for n in ("base", "e0", "e1"))
    return {"slices": [
        {"sources": [{"model": b, "layer_range": [1, 3]},
                     {"model": e0, "layer_range": [0, 2], "parameters": {"density": 0.3}},
                     {"model": e1, "layer_range": [2, 4], "parameters": {"weight": [0.2, 1.0]}}],
         "parameters": {"density": 0.6}},
        {"sources": [{"model": b, "layer_range": [0, 1]}, {"model": e1, "layer_range": [3, 4]}]},
    ], "merge_method": "ties", "base_model": b, "parameters": {"density": 0.9, "weight": 1.0}, "dtype": "float32"}


def test_renumbered_maps_output_names_to_source_names():
    keys = ["model.embed_tokens.weight", "model.layers.0.mlp.w", "model.layers.1.mlp.w", "model.layers.2.mlp.w",
            "model.layers.10.self_attn.q.weight", "model.norm.weight", "lm_head.weight"]
    assert renumbered(keys, "model.layers", 1, 2, 5, pre=True, post=False) == {
        "model.embed_tokens.weight": "model.embed_tokens.weight",
        "model.layers.5.mlp.w": "model.layers.1.mlp.w", "model.layers.6.mlp.w": "model.layers.2.mlp.w"}
    assert renumbered(keys, "model.layers", 10, 1, 0, pre=False, post=True) == {
        "model.layers.0.self_attn.q.weight": "model.layers.10.self_attn.q.weight",
        "model.norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}


def test_passthrough_frankenmerge_stacks_layers(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    got = ours(frankenmerge(zoo), tmp_path / "out")
    e0, e1 = tensors(zoo / "e0"), tensors(zoo / "e1")
    want = {k: v for k, v in e0.items() if not k.startswith("model.layers.") and "norm.weight" != k[-11:]}
    for i in range(3):  # layers 0-2 of e0
        want.update({k: v for k, v in e0.items() if k.startswith(f"model.layers.{i}.")})
    for j, i in enumerate(range(1, 4), start=3):  # layers 1-3 of e1 as 3-5
        want.update({k.replace(f"model.layers.{i}.", f"model.layers.{j}.", 1): v for k, v in e1.items()
                     if k.startswith(f"model.layers.{i}.")})
    want["model.norm.weight"], want["lm_head.weight"] = e1["model.norm.weight"], e1["lm_head.weight"]
    want["model.embed_tokens.weight"] = e0["model.embed_tokens.weight"]
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    # layer_types rebuilt from the layers taken (e0: all full; e1's layers 1-3: full, sliding, sliding)
    assert cfg["layer_types"] == ["full_attention"] * 4 + ["sliding_attention"] * 2
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(model.model.layers) == 6
    assert torch.equal(model.model.layers[5].mlp.up_proj.weight, e1["model.layers.3.mlp.up_proj.weight"])


def test_parse_gives_a_layered_recipe_with_per_slice_methods(zoo):
    r = parse_config(ties_slices(zoo))
    assert isinstance(r, LayeredRecipe) and r.n_layers == 3
    first, second = r.parts
    assert (first.out_start, first.n_layers, second.out_start, second.n_layers) == (0, 2, 2, 1)
    assert first.recipe.method.density == [0.3, 0.6] and second.recipe.method.density == 0.9
    assert first.pre and not first.post and second.post and not second.pre
    assert [first.start_of(str(zoo / n)) for n in ("base", "e0", "e1")] == [1, 0, 2]


def test_slice_layers_use_the_slice_base_and_gradient(zoo, tmp_path):
    """A slerp slice with a t gradient: output layer i of the slice is slerp(base layer, e0 layer)
    at t = i / (n - 1) over the slice, exactly as merging that one pair of tensors."""
    from lightning_merge import merge_models
    from lightning_merge.methods import Slerp

    def slerp(key, a, b, t):
        return merge_models({key: a[key]}, [{key: b[key]}], Slerp(t=t))[key]

    got = ours(sliced_merges(zoo), tmp_path / "out")
    b, e0, e1 = tensors(zoo / "base"), tensors(zoo / "e0"), tensors(zoo / "e1")
    name = "mlp.down_proj.weight"
    for layer, other, t in [(0, e0, 0.2), (1, e0, 0.9), (2, e1, 0.3), (3, e1, 0.3)]:
        key = f"model.layers.{layer}.{name}"
        want = slerp(key, b, other, t)
        torch.testing.assert_close(got[key], want, rtol=0, atol=1e-6)
    # outside the layers: the first slice's t (global 0.5, t = 0 on a gradient-free setting) for the
    # embeddings, the last slice's sources and t for the final norm
    key = "model.norm.weight"
    want = slerp(key, b, e1, 0.3)
    torch.testing.assert_close(got[key], want, rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 4


@pytest.mark.parametrize("change, message", [
    (lambda c: c["slices"][0]["sources"][1].update(layer_range=[0, 1]), r"slices\[0\]: every source .* same number"),
    (lambda c: c["slices"][1]["sources"][1].update(layer_range=[3, 5]), r"sources\[1\].layer_range.*4 layers"),
    (lambda c: c["slices"][1]["sources"][1].update(layer_range=[2, 2]), r"0 <= start < end"),
    (lambda c: c["slices"][1]["sources"].pop(0), r"slices\[1\].*base_model.*not one of this slice's sources"),
    (lambda c: c["slices"][0].update(bogus=1), r"slices\[0\].bogus"),
])
def test_bad_layer_slices_are_refused_naming_the_slice(zoo, change, message):
    c = ties_slices(zoo)
    change(c)
    with pytest.raises(ConfigError, match=message):
        parse_config(c)


def test_layered_merge_refuses_peft_output_before_writing(zoo, tmp_path):
    r = parse_config(frankenmerge(zoo))
    with pytest.raises(ConfigError, match="PEFT adapter output is not supported"):
        r.merge(tmp_path / "out", out_format="peft")
    assert not (tmp_path / "out").exists()


def _mergekit(config: dict, out: Path) -> dict[str, torch.Tensor]:
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(config), str(out),
              options=MergeOptions(device="cpu", quiet=True, copy_tokenizer=False, write_model_card=False))
    return tensors(out)


@pytest.mark.parity
def test_mergekit_leaves_layer_types_stale(zoo, tmp_path):
    """mergekit 0.1.5 keeps a Qwen2 config's 4 ``layer_types`` for the 6-layer frankenmerge, which
    transformers then refuses to load: the reason we rebuild the list (tested above)."""
    with pytest.raises(Exception, match="layer_types"):
        _mergekit(frankenmerge(zoo), tmp_path / "mk")


@pytest.mark.parity
@pytest.mark.parametrize("make", [frankenmerge, sliced_merges, ties_slices])
def test_layered_slices_equal_mergekit(llama_zoo, tmp_path, make):
    config = make(llama_zoo)
    out = tmp_path / "mk"
    want = _mergekit(config, out)
    got = ours(config, tmp_path / "ours")
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    ours_cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    mk_cfg = json.loads((out / "config.json").read_text())
    assert ours_cfg["num_hidden_layers"] == mk_cfg["num_hidden_layers"]


def test_tokenizer_forms_are_refused_with_layer_slices(zoo):
    c = {**frankenmerge(zoo), "tokenizer_source": "union"}
    with pytest.raises(ConfigError, match="tokenizer_source: tokenizer forms other than the base's"):
        parse_config(c)
    assert isinstance(parse_config({**frankenmerge(zoo), "tokenizer_source": "base"}), LayeredRecipe)
