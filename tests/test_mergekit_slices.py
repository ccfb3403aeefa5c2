"""mergekit's whole-model ``slices:`` form: rewritten to ``models:`` exactly as mergekit plans it
(layer-range slices: tests/test_mergekit_layered.py), and
(parity extra) the same tensors as mergekit 0.1.5 for the README's gradient SLERP and a TIES
slice with per-source and slice-level parameters."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lightning_merge.cli import main
from lightning_merge.errors import ConfigError
from lightning_merge.mergekit import parse_config
from lightning_merge.mergekit.slices import layer_count, slices_as_models

LAYERS = 2


def _llama(hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=LAYERS,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slices_zoo")
    torch.manual_seed(0)
    base = _llama()
    base.save_pretrained(root / "base")
    gen = torch.Generator().manual_seed(1)
    for i in range(2):
        m = _llama()
        m.load_state_dict({k: v + 0.01 * (i + 1) * torch.randn(v.shape, generator=gen)
                           for k, v in base.state_dict().items()})
        m.save_pretrained(root / f"e{i}")
    return root


def src(root: Path, name: str, **params) -> dict:
    s = {"model": str(root / name), "layer_range": [0, LAYERS]}
    return {**s, "parameters": params} if params else s


def gradient_slerp(root: Path) -> dict:
    """mergekit's README / examples/gradient-slerp.yml, on the tiny models."""
    return {"slices": [{"sources": [src(root, "base"), src(root, "e0")]}], "merge_method": "slerp",
            "base_model": str(root / "base"),
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                 {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
            "dtype": "float32"}


def ties_slice(root: Path) -> dict:
    # mergekit's slice planner needs the base among the sources (as community TIES configs list it)
    return {"slices": [{"sources": [src(root, "base"), src(root, "e0", weight=1.0, density=0.4),
                                    src(root, "e1", weight=[0.2, 0.9])],
                        "parameters": {"density": 0.6}, "base_model": str(root / "base")}],
            "merge_method": "ties", "parameters": {"density": 0.9, "lambda": 1.1, "normalize": True},
            "dtype": "float32"}


def test_layer_count_reads_config(zoo):
    assert layer_count(str(zoo / "base")) == LAYERS
    assert layer_count(str(zoo / "missing")) is None


def test_whole_model_slice_is_the_models_form(zoo):
    c = ties_slice(zoo)
    got = slices_as_models(c, str)
    assert "slices" not in got and got["base_model"] == str(zoo / "base")
    assert got["models"] == [{"model": str(zoo / "base")},
                             {"model": str(zoo / "e0"), "parameters": {"weight": 1.0, "density": 0.4}},
                             {"model": str(zoo / "e1"), "parameters": {"weight": [0.2, 0.9]}}]
    # the slice's parameters win over the global ones key by key (source > slice > global)
    assert got["parameters"] == {"density": 0.6, "lambda": 1.1, "normalize": True}
    assert c["slices"][0]["parameters"] == {"density": 0.6}  # the input is not modified
    a = parse_config(c)
    b = parse_config(got)
    assert a.method == b.method and a.weights == b.weights


@pytest.mark.parametrize("change, message", [
    (lambda c: c["slices"][0]["sources"][1].update(layer_range=[0, 1]), r"slices\[0\]: every source .* same number"),
    (lambda c: c["slices"][0]["sources"][1].update(layer_range=[0, 3]), r"sources\[1\].layer_range.*2 layers"),
    (lambda c: c["slices"][0]["sources"][2].update(layer_range="all"), r"sources\[2\].layer_range: expected"),
    (lambda c: c["slices"][0]["sources"][2].update(model="/nowhere"), "cannot tell how many layers"),
    (lambda c: c["slices"][0].update(bogus=1), r"slices\[0\].bogus"),
    (lambda c: c.update(models=[{"model": "x"}]), "not both"),
])
def test_bad_slices_are_refused_naming_the_key(zoo, change, message):
    c = ties_slice(zoo)
    change(c)
    with pytest.raises(ConfigError, match=message):
        parse_config(c)


def test_residual_weight_is_ignored_with_a_warning(zoo, caplog):
    c = ties_slice(zoo)
    c["slices"][0]["residual_weight"] = 0.5
    with caplog.at_level(logging.WARNING, logger="lightning_merge.mergekit.slices"):
        r = parse_config(c)
    assert "residual_weight is ignored" in caplog.text
    assert r.method == parse_config(ties_slice(zoo)).method


def _ours(config: dict, out: Path) -> dict[str, torch.Tensor]:
    cfg = out.with_suffix(".yaml")
    cfg.write_text(yaml.safe_dump(config))
    shutil.rmtree(out, ignore_errors=True)
    assert main(["merge", str(cfg), str(out), "--no-progress"]) == 0
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_slice_form_merges_as_models_form(zoo, tmp_path):
    c = ties_slice(zoo)
    a = _ours(c, tmp_path / "slices")
    b = _ours(slices_as_models(c, str), tmp_path / "models")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parity
@pytest.mark.parametrize("make", [gradient_slerp, ties_slice])
def test_slices_equal_mergekit(zoo, tmp_path, make):
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = make(zoo)
    out = tmp_path / "mk"
    run_merge(MergeConfiguration.model_validate(config), str(out),
              options=MergeOptions(device="cpu", quiet=True, copy_tokenizer=False, write_model_card=False))
    want = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    got = _ours(config, tmp_path / "ours")
    assert set(got) == set(want)
    base = load_file(zoo / "base" / "model.safetensors")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(got[k], base[k]) for k in base)


def test_unlisted_base_is_no_input_of_a_linear_slice(zoo):
    """mergekit adds an unlisted base_model as one more input only to ``models:``; in a slice the
    linear average is over the sources alone."""
    c = {"slices": [{"sources": [src(zoo, "e0"), src(zoo, "e1")]}], "merge_method": "linear",
         "base_model": str(zoo / "base")}
    got = slices_as_models(c, str)
    assert "base_model" not in got
    r = parse_config(c)
    assert r.experts == [str(zoo / "e0"), str(zoo / "e1")] and r.notes == []
    with_models = parse_config({"models": [{"model": str(zoo / n)} for n in ("e0", "e1")], "merge_method": "linear",
                                "base_model": str(zoo / "base")})
    assert len(with_models.experts) == 3  # the models: form does add it, as mergekit does
