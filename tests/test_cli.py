"""``lightning-merge merge CONFIG OUT`` end to end on tiny saved Hugging Face models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

from lightning_merge.api import merge_models
from lightning_merge.cli import main
from lightning_merge.methods import DareTies, TaskArithmetic, Ties

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128)


def _llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """base/, e0/, e1/ (base + noise) and lora/ (a PEFT LoRA adapter of base)."""
    root = tmp_path_factory.mktemp("cli_models")
    base = _llama(0)
    base.save_pretrained(root / "base")
    gen = torch.Generator().manual_seed(1)
    for i in range(2):
        m = _llama(0)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
        m.save_pretrained(root / f"e{i}")
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_llama(0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(root / "lora")
    return root


def write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def load_state(out: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    return {k: v.detach() for k, v in model.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def test_merge_ties_equals_python_api(models, tmp_path, capsys):
    config = {
        "merge_method": "ties",
        "base_model": str(models / "base"),
        "models": [
            {"model": str(models / "e0"), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": str(models / "e1"), "parameters": {"weight": 0.5, "density": 0.3}},
        ],
        "parameters": {"lambda": 0.9},
    }
    out = tmp_path / "out"
    assert main(["merge", str(write(tmp_path / "c.yaml", config)), str(out), "--no-progress"]) == 0
    merged = load_state(out)
    method = Ties(density=[0.5, 0.3], lambda_=0.9, normalize=True)
    ref = merge_models(models / "base", [models / "e0", models / "e1"], method, weights=[1.0, 0.5])
    for k, v in ref.items():
        assert torch.equal(merged[k], v), k
    captured = capsys.readouterr()
    summary = captured.out.strip().splitlines()
    assert len(summary) == 1
    assert "ties" in summary[0] and "tensors" in summary[0] and str(out) in summary[0]
    assert "info:" in captured.err  # logging on stderr


def test_dare_seed_out_dtype_and_overwrite(models, tmp_path):
    config = {
        "merge_method": "dare_ties",
        "base_model": str(models / "base"),
        "models": [{"model": str(models / f"e{i}"), "parameters": {"weight": 1.0, "density": 0.5}}
                   for i in range(2)],
        "seed": 3,
    }
    cfg = str(write(tmp_path / "c.yaml", config))
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["merge", cfg, str(a)]) == 0
    assert main(["merge", cfg, str(b), "--seed", "3", "--out-dtype", "bfloat16"]) == 0
    sa, sb = load_state(a), load_state(b)
    ref = merge_models(models / "base", [models / "e0", models / "e1"],
                       DareTies(density=0.5, rescale="l1", normalize=False), seed=3)
    for k, v in ref.items():
        assert torch.equal(sa[k], v), k
        assert sb[k].dtype == torch.bfloat16 and torch.equal(sb[k], v.to(torch.bfloat16)), k
    # a different seed gives a different draw; an existing output needs --overwrite
    assert main(["merge", cfg, str(a), "--seed", "4"]) == 2
    assert_same(load_state(a), sa)
    assert main(["merge", cfg, str(a), "--seed", "4", "--overwrite"]) == 0
    assert not torch.equal(load_state(a)["model.layers.0.mlp.up_proj.weight"],
                           sa["model.layers.0.mlp.up_proj.weight"])


def test_base_plus_adapter_and_adapter_folder(models, tmp_path):
    base = str(models / "base")
    ref = merge_models(base, [models / "lora", models / "e0"], TaskArithmetic(lambda_=1.0), weights=[1.0, 0.5])
    for spec in (f"{base}+{models / 'lora'}", str(models / "lora")):
        config = {"merge_method": "task_arithmetic", "base_model": base,
                  "models": [{"model": spec, "parameters": {"weight": 1.0}},
                             {"model": str(models / "e0"), "parameters": {"weight": 0.5}}]}
        out = tmp_path / f"out{len(spec)}"
        assert main(["merge", str(write(tmp_path / "c.yaml", config)), str(out)]) == 0
        merged = load_state(out)
        for k, v in ref.items():
            assert torch.equal(merged[k], v), k


def test_gradient_config_end_to_end(models, tmp_path):
    config = {
        "merge_method": "slerp",
        "base_model": str(models / "base"),
        "models": [{"model": str(models / "base")}, {"model": str(models / "e1")}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.5}]},
    }
    out = tmp_path / "out"
    assert main(["merge", str(write(tmp_path / "c.yaml", config)), str(out)]) == 0
    merged = load_state(out)
    base, e1 = load_state(models / "base"), load_state(models / "e1")
    name0, name1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(merged[name0], base[name0])  # t = 0 at layer 0
    assert torch.equal(merged[name1], e1[name1])  # t = 1 at layer 1


@pytest.mark.parametrize(
    "config,message",
    [
        ({"merge_method": "frobnicate", "base_model": "x", "models": [{"model": "y"}]}, "unknown method"),
        ({"merge_method": "ties", "models": [{"model": "y"}]}, "base_model: 'ties' needs base_model"),
        ({"merge_method": "ties", "base_model": "BASE", "models": [{"model": "E0"}],
          "parameters": {"densty": 0.5}}, "parameters.densty"),
        ({"merge_method": "ties", "base_model": "BASE", "models": [{"model": "nowhere"}]}, "nowhere"),
        ({"merge_method": "ties", "base_model": "BASE", "models": [{"model": "E0"}],
          "parameters": {"weight": -1.0}}, "negative weights"),
    ],
)
def test_bad_input_exits_2_without_output(models, tmp_path, capsys, config, message):
    text = yaml.safe_dump(config).replace("BASE", str(models / "base")).replace("E0", str(models / "e0"))
    path = tmp_path / "c.yaml"
    path.write_text(text)
    out = tmp_path / "out"
    assert main(["merge", str(path), str(out)]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("lightning-merge: error:")]
    assert len(lines) == 1 and message in lines[0]
    assert "Traceback" not in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["c.yaml"]  # no temporary folder left either


def test_missing_config_file(tmp_path, capsys):
    assert main(["merge", str(tmp_path / "none.yaml"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_usage_errors(capsys):
    assert main([]) == 2
    assert "subcommand is required" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["merge", "only-config"]) == 2
    assert main(["--help"]) == 0


@pytest.mark.skipif(importlib.util.find_spec("lightning_merge.lightning_cli") is not None,
                    reason="the LightningCLI subcommands are installed")
def test_training_subcommands_not_available_yet(capsys):
    assert main(["fit", "--config", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert "'fit'" in err and "not available" in err and "lightning-merge merge" in err
