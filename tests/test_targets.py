"""Targets: sharded safetensors, HF folders, single files, atomic output, PEFT LoRA export by SVD."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from lightning_merge.errors import ConfigError, IncompatibleTensorError, MergeError
from lightning_merge.targets import (
    OutputExistsError,
    atomic_output_dir,
    check_output_dir,
    save_hf_folder,
    save_lora_adapter,
    save_safetensors_shards,
    save_state_dict_file,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128)


def tiny_llama(tie: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**LLAMA, tie_word_embeddings=tie)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def make_config_dir(path: Path, model) -> Path:
    """A base-model folder (save_pretrained: weights, config with dtype, generation config) plus a tiny
    WordLevel tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    model.save_pretrained(path)
    vocab = {"[UNK]": 0, "[PAD]": 1, "hello": 2, "world": 3}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(path)
    return path


def stream(sd: dict[str, Tensor], fail_after: int | None = None) -> Iterator[tuple[str, Tensor]]:
    for i, (k, v) in enumerate(sd.items()):
        if fail_after is not None and i == fail_after:
            raise RuntimeError("merge failed mid-way")
        yield k, v


def state(model) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def siblings(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ shards

def test_shards_load_back_with_from_pretrained(tmp_path):
    model = tiny_llama()
    cfg = make_config_dir(tmp_path / "base", model)
    sd = {k: v.to(torch.bfloat16) for k, v in state(model).items()}
    out = save_hf_folder(stream(sd), tmp_path / "out", config_dir=cfg, max_shard_bytes=20_000)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    n = len(shards)
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"]) == set(sd)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
    for s in shards:
        with safe_open(str(out / s), "pt") as f:
            assert f.metadata()["format"] == "pt"
            assert sum(f.get_tensor(k).numel() * 2 for k in f.keys()) <= 20_000 or len(list(f.keys())) == 1
    assert not list(out.glob("*.partial"))

    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (cfg / name).read_bytes()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("hello world")["input_ids"] == [2, 3]

    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.dtype == torch.bfloat16
    got = loaded.state_dict()
    for k, v in sd.items():
        assert torch.equal(got[k], v), k
    assert siblings(tmp_path) == ["base", "out"]


def test_single_shard_and_oversized_tensor(tmp_path):
    sd = {"a": torch.ones(10), "big": torch.zeros(100), "c": torch.arange(5)}
    assert save_safetensors_shards(stream(sd), tmp_path / "one") == ["model.safetensors"]
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    files = save_safetensors_shards(stream(sd), tmp_path / "many", max_shard_bytes=100,
                                    metadata={"merge": "ties"})
    assert len(files) == 3  # "big" (400 bytes) gets a shard of its own
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["big"] == files[1]
    with safe_open(str(tmp_path / "many" / files[1]), "pt") as f:
        assert list(f.keys()) == ["big"] and f.metadata() == {"format": "pt", "merge": "ties"}
    with pytest.raises(MergeError, match="twice"):
        save_safetensors_shards(iter([("a", torch.ones(1)), ("a", torch.ones(1))]), tmp_path / "dup")
    assert list((tmp_path / "dup").iterdir()) == []


def test_shared_storage_is_written(tmp_path):
    w = torch.randn(4, 4)
    path = save_state_dict_file(iter([("x", w), ("y", w), ("z", w[0])]), tmp_path / "m.safetensors")
    got = load_file(str(path))
    assert torch.equal(got["x"], w) and torch.equal(got["y"], w) and torch.equal(got["z"], w[0])


# ---------------------------------------------------------------------------------------- tying

@pytest.mark.parametrize("equal", [True, False])
def test_tied_embeddings(tmp_path, equal):
    model = tiny_llama(tie=True)
    cfg = make_config_dir(tmp_path / "base", model)
    sd = state(model)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone() + (0 if equal else 0.5)
    out = save_hf_folder(stream(sd), tmp_path / "out", config_dir=cfg)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not equal)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] == equal
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(loaded.lm_head.weight, sd["lm_head.weight"])
    assert torch.equal(loaded.model.embed_tokens.weight, sd["model.embed_tokens.weight"])


def test_tied_head_before_embedding_is_held_back(tmp_path):
    model = tiny_llama(tie=True)
    cfg = make_config_dir(tmp_path / "base", model)
    sd = state(model)
    sd = {"lm_head.weight": sd["model.embed_tokens.weight"].clone(), **sd}
    out = save_hf_folder(stream(sd), tmp_path / "out", config_dir=cfg)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()


# ------------------------------------------------------------------------------------- atomicity

@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failing_stream_leaves_nothing(tmp_path, exc):
    def bad():
        yield "a", torch.ones(100)
        yield "b", torch.ones(100)
        raise exc("boom")

    with pytest.raises(exc):
        save_hf_folder(bad(), tmp_path / "out", max_shard_bytes=100)
    assert siblings(tmp_path) == []

    model = tiny_llama()
    with pytest.raises(RuntimeError, match="mid-way"):
        save_hf_folder(stream(state(model), fail_after=5), tmp_path / "out2", max_shard_bytes=1000)
    assert siblings(tmp_path) == []
    with pytest.raises(RuntimeError):
        save_state_dict_file(stream(state(model), fail_after=5), tmp_path / "m.safetensors")
    assert siblings(tmp_path) == []


def test_existing_output_refused_before_reading_then_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous merge")
    started = []

    def watched():
        started.append(True)
        yield "w", torch.ones(3)

    with pytest.raises(OutputExistsError, match=r"out.*overwrite=True"):
        save_hf_folder(watched(), out)
    with pytest.raises(OutputExistsError):
        save_lora_adapter(watched(), out, rank=2)
    with pytest.raises(FileExistsError):
        check_output_dir(out, overwrite=False)
    assert not started and (out / "old.txt").exists()

    save_hf_folder(watched(), out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert siblings(tmp_path) == ["out"]

    empty = tmp_path / "empty"
    empty.mkdir()
    save_hf_folder(watched(), empty)  # an empty directory is not "existing output"
    assert (empty / "model.safetensors").exists()

    f = tmp_path / "m.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(OutputExistsError):
        save_state_dict_file(watched(), f)
    save_state_dict_file(watched(), f, overwrite=True)
    assert torch.equal(load_file(str(f))["w"], torch.ones(3))
    assert siblings(tmp_path) == ["empty", "m.safetensors", "out"]


def test_atomic_output_dir_keeps_old_output_on_failure(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("v1")
    with pytest.raises(ValueError), atomic_output_dir(out, overwrite=True) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith("out.tmp-")
        (tmp / "new.txt").write_text("v2")
        raise ValueError("fail")
    assert siblings(tmp_path) == ["out"] and (out / "keep.txt").read_text() == "v1"


# ------------------------------------------------------------------------------------ LoRA export

def low_rank(out: int, inp: int, r: int, gen: torch.Generator) -> Tensor:
    return (torch.randn(out, r, generator=gen) @ torch.randn(r, inp, generator=gen)) * 0.05


def merge_adapter(base, adapter_dir: Path):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = peft.PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    assert not [w for w in caught if "missing" in str(w.message).lower()]
    return merged.state_dict()


def test_lora_export_of_low_rank_delta_is_exact(tmp_path, caplog):
    gen = torch.Generator().manual_seed(1)
    base = tiny_llama()
    base_sd = state(base)
    deltas = {}
    for k in base_sd:
        if any(p in k for p in ("q_proj", "v_proj", "down_proj", "embed_tokens")):
            deltas[k] = low_rank(*base_sd[k].shape, 4, gen)
    deltas["model.norm.weight"] = torch.full((32,), 0.1)          # cannot be carried by LoRA
    deltas["model.layers.0.mlp.up_proj.weight"] = torch.zeros(64, 32)  # unchanged: skipped

    with caplog.at_level(logging.WARNING, logger="lightning_merge"):
        report = save_lora_adapter(stream(deltas), tmp_path / "adapter", rank=4,
                                   base_model_name_or_path="tiny")
    assert report.unsupported == ["model.norm.weight"] and "model.norm.weight" in caplog.text
    assert report.skipped == ["model.layers.0.mlp.up_proj.weight"]
    modules = {k.removesuffix(".weight") for k, v in deltas.items() if v.ndim == 2 and v.any()}
    assert set(report) == modules
    assert max(report.values()) < 1e-5

    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 4 and cfg["rank_pattern"] == {}
    assert set(cfg["target_modules"]) == modules and cfg["base_model_name_or_path"] == "tiny"
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert tensors[f"{q}.lora_A.weight"].shape == (4, 32) and tensors[f"{q}.lora_B.weight"].shape == (32, 4)
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 128)

    merged = merge_adapter(base, tmp_path / "adapter")
    changed = {m + ".weight" for m in modules}
    for k, v in base_sd.items():
        expected = v + deltas[k] if k in changed else v
        torch.testing.assert_close(merged[k], expected, atol=1e-5, rtol=0, msg=k)


def test_lora_error_of_full_rank_delta_matches_singular_values(tmp_path):
    gen = torch.Generator().manual_seed(2)
    delta = torch.randn(48, 40, generator=gen)
    s = torch.linalg.svdvals(delta.double())
    report = save_lora_adapter(iter([("layer.proj.weight", delta)]), tmp_path / "a", rank=5, alpha=16.0)
    expected = float(s[5:].square().sum().sqrt() / s.square().sum().sqrt())
    assert report["layer.proj"] == pytest.approx(expected, rel=1e-4)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == 16.0
    t = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    key = "base_model.model.layer.proj"
    approx = (16.0 / 5) * t[f"{key}.lora_B.weight"] @ t[f"{key}.lora_A.weight"]
    rel = float(torch.linalg.matrix_norm(delta - approx) / torch.linalg.matrix_norm(delta))
    assert rel == pytest.approx(expected, rel=1e-4)


def test_lora_rank_clamped_to_matrix_size(tmp_path, caplog):
    gen = torch.Generator().manual_seed(3)
    base = tiny_llama()
    base_sd = state(base)
    deltas = {k: torch.randn(v.shape, generator=gen) * 0.01 for k, v in base_sd.items()
              if k.endswith(("q_proj.weight", "k_proj.weight", "up_proj.weight"))}
    with caplog.at_level(logging.INFO, logger="lightning_merge"):
        report = save_lora_adapter(stream(deltas), tmp_path / "a", rank=40)
    assert "clamped" in caplog.text
    assert max(report.values()) < 1e-5  # full rank reached: exact
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {k.removesuffix(".weight"): (16 if "k_proj" in k else 32) for k in deltas}
    merged = merge_adapter(base, tmp_path / "a")
    for k, v in deltas.items():
        torch.testing.assert_close(merged[k], base_sd[k] + v, atol=1e-5, rtol=0)


def test_randomized_svd_is_near_optimal_and_deterministic(tmp_path):
    gen = torch.Generator().manual_seed(4)
    delta = low_rank(300, 256, 6, gen) + 1e-3 * torch.randn(300, 256, generator=gen)
    s = torch.linalg.svdvals(delta.double())
    optimum = float(s[6:].square().sum().sqrt() / s.square().sum().sqrt())
    r1 = save_lora_adapter(iter([("m.weight", delta)]), tmp_path / "a", rank=6, svd="randomized")
    save_lora_adapter(iter([("m.weight", delta)]), tmp_path / "b", rank=6, svd="randomized")
    assert optimum * (1 - 1e-4) <= r1["m"] < optimum * 1.01
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_fan_in_fan_out_gpt2(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=128, n_positions=32)
    base = transformers.GPT2LMHeadModel(config).eval()
    base_sd = state(base)
    gen = torch.Generator().manual_seed(5)
    name = "transformer.h.0.attn.c_attn.weight"  # Conv1D: stored [in=32, out=96]
    delta = low_rank(32, 96, 3, gen)
    report = save_lora_adapter(iter([(name, delta)]), tmp_path / "a", rank=3, fan_in_fan_out=True)
    assert report["transformer.h.0.attn.c_attn"] < 1e-5
    merged = merge_adapter(base, tmp_path / "a")
    torch.testing.assert_close(merged[name], base_sd[name] + delta, atol=1e-5, rtol=0)


def test_lora_argument_errors(tmp_path):
    d = [("m.weight", torch.ones(4, 4))]
    with pytest.raises(ConfigError, match="rank"):
        save_lora_adapter(iter(d), tmp_path / "a", rank=0)
    with pytest.raises(ConfigError, match="alpha"):
        save_lora_adapter(iter(d), tmp_path / "a", rank=2, alpha=-1)
    with pytest.raises(IncompatibleTensorError, match="norm.weight"):
        save_lora_adapter(iter([*d, ("norm.weight", torch.ones(4))]), tmp_path / "a", rank=2,
                          unsupported="error")
    with pytest.raises(MergeError, match="no module"):
        save_lora_adapter(iter([("m.weight", torch.zeros(4, 4))]), tmp_path / "a", rank=2)
    big, small = ("big.weight", torch.ones(8, 8)), ("small.weight", torch.ones(8, 8) * 1e-4)
    report = save_lora_adapter(iter([big, small]), tmp_path / "a", rank=1, min_rel_change=0.01)
    assert list(report) == ["big"] and report.skipped == ["small.weight"]
    assert siblings(tmp_path) == ["a"]


# ------------------------------------------------------------------- streamed writes (known layout)

def _layout_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.bias": torch.randn(3, generator=g).to(torch.bfloat16),
        "c.ids": torch.arange(11),
        "d.mask": torch.tensor([True, False, True]),
        "e.weight": torch.randn(16, 16, generator=g).half(),
    }


def test_streamed_shards_equal_buffered(tmp_path):
    """Header-first streaming writes the same tensors as save_file, loadable by safetensors/transformers."""
    from safetensors.torch import load_file

    from lightning_merge.targets.shards import save_safetensors_shards

    tensors = _layout_tensors()
    layout = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    files = save_safetensors_shards(iter(tensors.items()), tmp_path / "s", max_shard_bytes=300, layout=layout)
    assert len(files) >= 2 and (tmp_path / "s" / "model.safetensors.index.json").is_file()
    loaded = {}
    for f in files:
        loaded.update(load_file(tmp_path / "s" / f))
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    single = save_safetensors_shards(iter(tensors.items()), tmp_path / "one", layout=layout)
    assert single == ["model.safetensors"]
    assert all(torch.equal(load_file(tmp_path / "one" / single[0])[k], v) for k, v in tensors.items())


def test_streamed_write_rejects_a_stream_off_its_layout(tmp_path):
    from lightning_merge.targets.hf import save_hf_folder

    tensors = _layout_tensors()
    layout = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    swapped = list(tensors.items())
    swapped[0], swapped[1] = swapped[1], swapped[0]
    with pytest.raises(MergeError, match="layout"):
        save_hf_folder(iter(swapped), tmp_path / "o", layout=layout)
    with pytest.raises(MergeError, match="ended before"):
        save_hf_folder(iter(list(tensors.items())[:-1]), tmp_path / "o", layout=layout)
    assert not (tmp_path / "o").exists()
    assert [p.name for p in tmp_path.iterdir()] == []
