"""PEFT LoRA adapters as delta sources: exact deltas against PEFT itself, merging through the engine,
rank/alpha patterns, rsLoRA, embeddings, fan_in_fan_out, and refusal of what is not a plain LoRA."""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from lightning_merge.engine import build_plan, run_plan
from lightning_merge.errors import SourceError
from lightning_merge.methods import TaskArithmetic
from lightning_merge.sources import HFFolderSource, LoraAdapterSource, SafetensorsFileSource, open_source

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128)
PEFT_PREFIX = "base_model.model."


def _llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(base model, its saved HF folder)."""
    model = _llama()
    folder = tmp_path_factory.mktemp("base") / "llama"
    model.save_pretrained(folder)
    return model, folder


def _adapter(model, config, folder: Path, seed: int = 1, **save_kwargs):
    """Wrap a copy of ``model`` with PEFT, save the adapter to ``folder``; returns the PeftModel."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(model), config)
        peft_model.save_pretrained(folder, **save_kwargs)
    return peft_model


def _lora_layers(peft_model) -> dict:
    """target weight name (base naming) -> PEFT LoRA layer."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            out[name.removeprefix(PEFT_PREFIX) + ".weight"] = module
    return out


def _lora_config(kind: str):
    from peft import LoraConfig

    common = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    if kind == "plain":
        return LoraConfig(**common)
    if kind == "rslora":
        return LoraConfig(**common, use_rslora=True)
    if kind == "patterns":
        return LoraConfig(**common, rank_pattern={"layers.1.self_attn.q_proj": 2, "v_proj": 6},
                          alpha_pattern={r"layers\.0\..*v_proj": 3, "q_proj": 16})
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["plain", "rslora", "patterns"])
def test_deltas_and_engine_merge_equal_peft(base, tmp_path, kind):
    model, base_dir = base
    peft_model = _adapter(model, _lora_config(kind), tmp_path / kind)
    src = LoraAdapterSource(tmp_path / kind)
    layers = _lora_layers(peft_model)

    assert src.space == "delta" and src.config_dir is None
    assert sorted(src.keys()) == sorted(layers)
    assert not any(k.startswith(PEFT_PREFIX) for k in src.keys())
    assert "model.layers.0.self_attn.q_proj.weight" in src.keys()
    for key, layer in layers.items():
        m = src.modules[key]
        assert m.r == layer.r["default"] and m.scaling == pytest.approx(layer.scaling["default"], rel=1e-15)
        expected = layer.get_delta_weight("default").detach()
        delta = src.get(key)
        assert delta.dtype == torch.float32 and src.dtype(key) == torch.float32
        assert src.shape(key) == tuple(delta.shape) == tuple(layer.get_base_layer().weight.shape)
        torch.testing.assert_close(delta, expected, atol=1e-7, rtol=0)
        assert delta.abs().max() > 0  # init_lora_weights=False: B != 0

    if kind == "patterns":  # PEFT's own resolution: regex/suffix, first matching pattern wins
        assert src.modules["model.layers.1.self_attn.q_proj.weight"].r == 2
        assert src.modules["model.layers.0.self_attn.q_proj.weight"].r == 4
        assert src.modules["model.layers.0.self_attn.v_proj.weight"].alpha == 3
        assert src.modules["model.layers.1.self_attn.v_proj.weight"].alpha == 8
        assert src.modules["model.layers.1.self_attn.v_proj.weight"].r == 6
        assert src.modules["model.layers.1.self_attn.q_proj.weight"].alpha == 16
    if kind == "rslora":
        assert src.modules["model.layers.0.self_attn.q_proj.weight"].scaling == pytest.approx(8 / 2)

    plan = build_plan(HFFolderSource(base_dir), [src], TaskArithmetic(lambda_=1.0), weights=[1.0])
    merged = dict(run_plan(plan))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft_model.merge_and_unload().state_dict()
    assert sorted(merged) == sorted(reference)
    for k, v in reference.items():
        torch.testing.assert_close(merged[k], v, atol=1e-6, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_embedding_lora_and_bin_adapter(base, tmp_path):
    from peft import LoraConfig

    model, base_dir = base
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    peft_model = _adapter(model, cfg, tmp_path / "emb")
    _adapter(model, cfg, tmp_path / "emb_bin", safe_serialization=False)
    assert (tmp_path / "emb_bin" / "adapter_model.bin").is_file()
    src = open_source(tmp_path / "emb")
    assert isinstance(src, LoraAdapterSource)
    layer = _lora_layers(peft_model)["model.embed_tokens.weight"]
    key = "model.embed_tokens.weight"
    assert src.modules[key].layer == "embedding"
    assert src.shape(key) == (TINY["vocab_size"], TINY["hidden_size"])
    torch.testing.assert_close(src.get(key), layer.get_delta_weight("default"), atol=1e-7, rtol=0)
    src.validate_against(HFFolderSource(base_dir))
    # the .bin adapter (same seed) reads the same deltas
    src_bin = LoraAdapterSource(tmp_path / "emb_bin")
    assert sorted(src_bin.keys()) == sorted(src.keys())
    for k in src.keys():
        assert torch.equal(src_bin.get(k), src.get(k)), k


def test_fan_in_fan_out_conv1d(tmp_path):
    """GPT-2's Conv1D stores weights (in, out): PEFT sets fan_in_fan_out and transposes the delta."""
    from peft import LoraConfig
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16))
    model.save_pretrained(tmp_path / "gpt2")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                     init_lora_weights=False)
    peft_model = _adapter(model, cfg, tmp_path / "ad")
    src = LoraAdapterSource(tmp_path / "ad")
    key = "transformer.h.0.attn.c_attn.weight"
    assert src.keys() == [key] and src.modules[key].fan_in_fan_out
    assert src.shape(key) == (32, 96) == tuple(model.transformer.h[0].attn.c_attn.weight.shape)
    layer = _lora_layers(peft_model)[key]
    torch.testing.assert_close(src.get(key), layer.get_delta_weight("default"), atol=1e-7, rtol=0)
    plan = build_plan(HFFolderSource(tmp_path / "gpt2"), [src], TaskArithmetic(lambda_=1.0))
    merged = dict(run_plan(plan, names=[key]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft_model.merge_and_unload().state_dict()[key]
    torch.testing.assert_close(merged[key], reference, atol=1e-6, rtol=0)


def test_opening_reads_headers_only(base, tmp_path, monkeypatch):
    model, base_dir = base
    _adapter(model, _lora_config("plain"), tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())

    def boom(self, key):
        raise AssertionError(f"tensor {key} read eagerly")

    monkeypatch.setattr(SafetensorsFileSource, "get", boom)
    src = LoraAdapterSource(tmp_path / "ad" / "adapter_config.json")  # the config file path works too
    src.validate_against(HFFolderSource(base_dir))
    assert src.base_model_name_or_path == cfg["base_model_name_or_path"]
    assert len(src.keys()) == 4


# ------------------------------------------------------------------------------------------ refusals

@pytest.fixture(scope="module")
def plain_adapter(base, tmp_path_factory):
    model, _ = base
    folder = tmp_path_factory.mktemp("plain") / "ad"
    _adapter(model, _lora_config("plain"), folder)
    return folder


def test_adapter_for_another_base(base, plain_adapter, tmp_path):
    other = _llama(hidden_size=48, intermediate_size=96)
    other.save_pretrained(tmp_path / "wide")
    src = LoraAdapterSource(plain_adapter)
    with pytest.raises(SourceError) as err:
        src.validate_against(HFFolderSource(tmp_path / "wide"))
    msg = str(err.value)
    assert "adapter made for another base" in msg and "self_attn" in msg
    assert "[32, 32]" in msg and "[48, 48]" in msg
    with pytest.raises(SourceError, match="adapter made for another base"):
        build_plan(HFFolderSource(tmp_path / "wide"), [src], TaskArithmetic(lambda_=1.0))
    # a base lacking the targeted module altogether
    from lightning_merge.sources import StateDictSource

    partial = StateDictSource({"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 32)}, label="<tiny>")
    with pytest.raises(SourceError, match="another base.*does not have"):
        src.validate_against(partial)


def test_dora_adapter_refused(base, tmp_path):
    from peft import LoraConfig

    model, _ = base
    _adapter(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), tmp_path / "dora")
    with pytest.raises(SourceError, match=r"adapter_config\.json.*use_dora.*DoRA"):
        open_source(tmp_path / "dora")


def test_ia3_adapter_refused(base, tmp_path):
    from peft import IA3Config

    model, _ = base
    cfg = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    _adapter(model, cfg, tmp_path / "ia3")
    with pytest.raises(SourceError, match=r"ia3.*adapter_config\.json.*peft_type is IA3"):
        LoraAdapterSource(tmp_path / "ia3")


def test_modules_to_save_refused(base, tmp_path):
    from peft import LoraConfig

    model, _ = base
    cfg = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    _adapter(model, cfg, tmp_path / "mts")
    match = r"adapter_model\.safetensors.*full tensors.*modules_to_save.*lm_head"
    with pytest.raises(SourceError, match=match):
        LoraAdapterSource(tmp_path / "mts")


@pytest.mark.parametrize(
    "edit, pattern",
    [
        ({"lora_bias": True}, "lora_bias"),
        ({"use_dora": True}, "use_dora"),
        ({"init_lora_weights": "pissa"}, "pissa.*path_initial_model_for_weight_conversion"),
        ({"peft_type": "LOHA"}, "peft_type is LOHA"),
        ({"r": 8}, "q_proj.*rank r=8"),
        ({"rank_pattern": {"q_proj[": 2}}, "rank_pattern.*not a valid regex"),
    ],
)
def test_config_edits_refused(plain_adapter, tmp_path, edit, pattern):
    folder = tmp_path / "edited"
    shutil.copytree(plain_adapter, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(SourceError, match=pattern) as err:
        LoraAdapterSource(folder)
    assert "edited" in str(err.value)


def test_missing_files(plain_adapter, tmp_path):
    with pytest.raises(SourceError, match="missing.*no such adapter folder"):
        LoraAdapterSource(tmp_path / "missing")
    folder = tmp_path / "noweights"
    shutil.copytree(plain_adapter, folder)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(SourceError, match=r"noweights.*adapter_model\.safetensors"):
        open_source(folder)
    noconfig = tmp_path / "noconfig"
    shutil.copytree(plain_adapter, noconfig)
    (noconfig / "adapter_config.json").unlink()
    with pytest.raises(SourceError, match=r"noconfig.*adapter_config\.json"):
        LoraAdapterSource(noconfig)
    src = LoraAdapterSource(plain_adapter)
    with pytest.raises(SourceError, match="does not change 'lm_head.weight'"):
        src.get("lm_head.weight")
