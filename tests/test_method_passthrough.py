"""``passthrough`` (one model copied, optional per-tensor ``scale``): values, edge cases, YAML, and
parity with mergekit 0.1.5's ``models:`` form, which must be bit-identical (one float32 product,
or a copy, per tensor; also for a bfloat16 model, where both round the product once).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mergekit_helpers import assert_ignored, parity_module, run_both

from lightning_merge.engine import build_plan, run_plan
from lightning_merge.errors import ConfigError
from lightning_merge.mergekit import parse_config
from lightning_merge.methods import TensorInputs, get_method
from lightning_merge.methods.passthrough import Passthrough
from lightning_merge.sources import StateDictSource

KEY = "model.layers.0.self_attn.o_proj.weight"


def merge(expert, base=None, weights=None, **params):
    b = None if base is None else StateDictSource({KEY: base}, "base")
    plan = build_plan(b, [StateDictSource({KEY: expert}, "e0")], Passthrough(**params), weights=weights)
    return dict(run_plan(plan))[KEY]


# ------------------------------------------------------------------------------------------ values

def test_no_scale_is_a_bitwise_copy():
    e = torch.randn(5, 7)
    assert torch.equal(merge(e), e)
    h = torch.randn(5, 7).to(torch.bfloat16)
    out = merge(h)
    assert out.dtype == torch.bfloat16 and torch.equal(out, h)


@pytest.mark.parametrize("scale", [0.5, 0.0, -1.25, 3.0, [2.0]])
def test_scale_multiplies(scale):
    e = torch.tensor([[1.0, -2.0], [0.25, 4.0]])
    s = scale[0] if isinstance(scale, list) else scale
    assert torch.equal(merge(e, scale=scale), e * s)


def test_bfloat16_product_rounds_once():
    e = torch.randn(64).to(torch.bfloat16)
    out = merge(e, scale=0.3)
    assert out.dtype == torch.bfloat16 and torch.equal(out, (e.float() * 0.3).to(torch.bfloat16))


def test_with_a_base_the_expert_is_copied_and_an_adapter_delta_is_applied():
    base, e = torch.randn(3, 3), torch.randn(3, 3)
    assert torch.equal(merge(e, base=base, scale=2.0), e * 2.0)
    # a delta expert (LoRA-like) becomes base + delta in weight space
    b = StateDictSource({KEY: base}, "base")
    delta = StateDictSource({KEY: e}, "lora", space="delta")
    out = dict(run_plan(build_plan(b, [delta], Passthrough())))[KEY]
    torch.testing.assert_close(out, base + e)


def test_empty_tensor_and_missing_tensor():
    out = Passthrough(scale=2.0).merge(TensorInputs("w", None, [torch.zeros(0, 4)], [0], [1.0]))
    assert out.shape == (0, 4)
    base = torch.randn(2)
    assert torch.equal(Passthrough().merge(TensorInputs("w", base, [], [], [], n_experts=1)), base)
    with pytest.raises(ConfigError, match="no tensor 'w'"):
        Passthrough().merge(TensorInputs("w", None, [], [], [], n_experts=1))


# ------------------------------------------------------------------------------------------ validation

@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "x", True])
def test_bad_scale_names_the_parameter(scale):
    with pytest.raises(ConfigError, match="passthrough: parameter 'scale'"):
        Passthrough(scale=scale)


def test_exactly_one_expert():
    e = StateDictSource({KEY: torch.zeros(2)}, "e")
    with pytest.raises(ConfigError, match="passthrough: copies exactly one model, got 2"):
        build_plan(None, [e, StateDictSource({KEY: torch.zeros(2)}, "f")], Passthrough())
    with pytest.raises(ConfigError, match="'scale' has 2 values but the merge has 1 experts"):
        build_plan(None, [e], Passthrough(scale=[1.0, 2.0]))


def test_weights_are_refused():
    with pytest.raises(ConfigError, match="passthrough: a weight"):
        merge(torch.zeros(2), weights=[0.5])


def test_get_method_by_name():
    assert get_method("passthrough", scale=0.5) == Passthrough(scale=0.5)


# ------------------------------------------------------------------------------------------ YAML

def test_yaml_forms():
    r = parse_config({"merge_method": "passthrough", "models": [{"model": "a"}]})
    assert r.method == Passthrough() and r.experts == ["a"] and r.base == "a" and r.weights == [1.0]
    r = parse_config({"merge_method": "passthrough", "base_model": "a",
                      "models": [{"model": "a", "parameters": {"scale": 0.5}}]})
    assert r.method == Passthrough(scale=0.5) and r.experts == ["a"]
    r = parse_config({"merge_method": "passthrough", "models": [{"model": "a"}], "parameters": {"scale": 2}})
    assert r.method == Passthrough(scale=2.0)
    r = parse_config({"merge_method": "passthrough", "models": [{"model": "a"}],
                      "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]}})
    assert r.tensor_params is not None


@pytest.mark.parametrize("config,match", [
    ({"models": [{"model": "a"}, {"model": "b"}]}, r"needs exactly 1 model\(s\), got 2 \(passthrough copies one"),
    ({"base_model": "b", "models": [{"model": "a"}]}, "base_model is not one of the listed models"),
    ({"models": [{"model": "a", "parameters": {"scal": 1.0}}]}, "unknown parameter for 'passthrough'.*did you mean"),
    ({"models": [{"model": "a", "parameters": {"scale": "big"}}]}, "expected a number"),
])
def test_yaml_refusals(config, match):
    with pytest.raises(ConfigError, match=match):
        parse_config({"merge_method": "passthrough", **config})


def test_yaml_ignores_weight(caplog):
    plain = {"merge_method": "passthrough", "models": [{"model": "a"}]}
    assert_ignored({"merge_method": "passthrough", "models": [{"model": "a", "parameters": {"weight": 1.0}}]}, plain,
                   caplog, "models[0].parameters.weight")


# ------------------------------------------------------------------------------------------ parity


@pytest.fixture(scope="module")
def llamas(llamas):  # the session's models, plus a bfloat16 copy of e1
    from transformers import LlamaForCausalLM

    root = llamas
    LlamaForCausalLM.from_pretrained(root / "e1").to(torch.bfloat16).save_pretrained(root / "e1_bf16")
    return root


def M(name, **params):  # noqa: N802
    return {"model": name, "parameters": params} if params else {"model": name}


CONFIGS = {
    "copy": {"models": [M("e0")]},
    "per_model_scale": {"models": [M("e0", scale=0.5)]},
    "global_filters_and_gradient": {
        "models": [M("e2")],
        "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"filter": "mlp", "value": [1.0, -0.5]},
                                 {"filter": "norm", "value": 1.0}, {"value": 0.75}]}},
    "base_model_is_the_model": {
        "base_model": "e1", "models": [M("e1", scale=[{"filter": "embed", "value": 2.0}])],
        "parameters": {"scale": 0.3}},
    "bfloat16_model": {"models": [M("e1_bf16", scale=0.3)]},
}


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_end_to_end_parity_with_mergekit(name, llamas, tmp_path):
    p = parity_module()
    config = p._resolve({"merge_method": "passthrough", **CONFIGS[name]}, llamas)
    ours, ref = run_both(config, tmp_path)
    for k, r in ref.items():
        assert ours[k].dtype == r.dtype and torch.equal(ours[k], r), f"{name}: {k}"
    source = p._load(Path(config["models"][0]["model"]))
    assert any(not torch.equal(r, source[k]) for k, r in ref.items()) == (name != "copy")


@pytest.mark.parity
def test_mergekit_also_refuses_a_second_input(llamas, tmp_path):
    p = parity_module()
    for config in ({"base_model": "base", "models": [M("e0")]}, {"models": [M("e0"), M("e1")]}):
        config = p._resolve({"merge_method": "passthrough", **config}, llamas)
        with pytest.raises(ValueError, match="exactly 1 inputs"):
            p.run_mergekit(config, tmp_path / "mergekit")
        with pytest.raises(ConfigError, match="needs exactly 1 model"):
            parse_config(config)
