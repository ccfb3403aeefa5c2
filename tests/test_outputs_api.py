"""merge_models output formats end to end: single .safetensors, LoRA-to-LoRA merge exported as a PEFT
adapter (exact when the rank suffices), and the CUDA path (skipped without a GPU)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from safetensors.torch import load_file

from lightning_merge import ConfigError, TaskArithmetic, Ties, merge_models
from lightning_merge.cli import main as cli_main

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A saved tiny Llama base, one full fine-tune and two real PEFT LoRA adapters (r = 4)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**TINY))
    base.save_pretrained(root / "base")
    ft = copy.deepcopy(base)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    ft.save_pretrained(root / "ft")
    for i in (1, 2):
        torch.manual_seed(i)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            get_peft_model(copy.deepcopy(base), cfg).save_pretrained(root / f"lora{i}")
    return root


def test_single_safetensors_file(models, tmp_path):
    out = merge_models(models / "base", [models / "ft"], TaskArithmetic(lambda_=0.5), out=tmp_path / "m.safetensors")
    sd = load_file(out)
    ref = merge_models(models / "base", [models / "ft"], TaskArithmetic(lambda_=0.5))
    assert sd.keys() == ref.keys()
    assert all(torch.equal(sd[k], ref[k]) for k in sd)


def test_lora_to_lora_merge_exported_as_adapter_is_exact(models, tmp_path):
    """TA of two rank-4 adapters has rank <= 8: a rank-8 export reproduces the dense merge."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    experts = [models / "lora1", models / "lora2"]
    dense = merge_models(models / "base", experts, TaskArithmetic(lambda_=0.7))
    report = merge_models(models / "base", experts, TaskArithmetic(lambda_=0.7), out=tmp_path / "ad",
                          out_format="peft", adapter_rank=8)
    assert sorted(report) == sorted(k.removesuffix(".weight") for k in dense if "q_proj" in k or "v_proj" in k)
    assert max(report.values()) < 1e-5
    base = LlamaForCausalLM.from_pretrained(models / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(base, tmp_path / "ad").merge_and_unload().state_dict()
    for k, v in dense.items():
        torch.testing.assert_close(merged[k], v, atol=1e-5, rtol=0)


def test_truncated_adapter_reports_its_error(models, tmp_path):
    """TIES on the dense deltas is not low-rank: a rank-2 export reports a real, bounded error."""
    report = merge_models(models / "base", [models / "lora1", models / "lora2"], Ties(density=0.5),
                          out=tmp_path / "ad2", out_format="peft", adapter_rank=2)
    assert report and all(0.0 < e < 1.0 for e in report.values())


def test_cli_peft_format(models, tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text(
        f"merge_method: task_arithmetic\nbase_model: {models / 'base'}\n"
        f"models:\n  - model: {models / 'lora1'}\n    parameters: {{weight: 1.0}}\n"
    )
    assert cli_main(["merge", str(cfg), str(tmp_path / "o"), "--format", "peft", "--adapter-rank", "4"]) == 0
    assert (tmp_path / "o" / "adapter_config.json").is_file()


def test_bad_output_arguments(models, tmp_path):
    with pytest.raises(ConfigError, match="out_format"):
        merge_models(models / "base", [models / "ft"], TaskArithmetic(), out=tmp_path / "x", out_format="gguf")
    with pytest.raises(ConfigError, match="adapter_rank"):
        merge_models(models / "base", [models / "ft"], TaskArithmetic(), out=tmp_path / "x", out_format="peft",
                     adapter_rank=0)
    assert not (tmp_path / "x").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
def test_cuda_merge_matches_cpu(models):
    """Deterministic methods give the same tensors on the GPU (float32 rounding aside)."""
    cpu = merge_models(models / "base", [models / "ft", models / "lora1"], Ties(density=0.3))
    gpu = merge_models(models / "base", [models / "ft", models / "lora1"], Ties(density=0.3), device="cuda")
    for k in cpu:
        assert gpu[k].device.type == "cpu"
        torch.testing.assert_close(gpu[k], cpu[k], atol=1e-6, rtol=1e-6)


def test_pad_mean_vocabulary_writes_a_loadable_folder(models, tmp_path):
    """An expert with 4 added tokens, vocab_policy="pad_mean": the output has the larger vocabulary
    in its tensors and in config.json, and loads with transformers."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    resized = LlamaForCausalLM.from_pretrained(models / "ft")
    resized.resize_token_embeddings(TINY["vocab_size"] + 4, mean_resizing=False)
    resized.save_pretrained(tmp_path / "resized")
    out = merge_models(models / "base", [tmp_path / "resized", models / "ft"], TaskArithmetic(lambda_=0.5),
                       out=tmp_path / "merged", vocab_policy="pad_mean")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == TINY["vocab_size"] + 4
    assert model.get_input_embeddings().weight.shape[0] == TINY["vocab_size"] + 4
