"""File sources: safetensors files, HF folders (single / sharded, safetensors / .bin), torch and Lightning
checkpoints, ``open_source`` dispatch, and the errors for broken or unknown inputs."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from lightning_merge.engine import build_plan, run_plan
from lightning_merge.errors import SourceError
from lightning_merge.methods import TaskArithmetic
from lightning_merge.sources import (
    HFFolderSource,
    ModuleSource,
    SafetensorsFileSource,
    Source,
    StateDictSource,
    TorchFileSource,
    align,
    open_source,
)

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128)


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY))


def _save_bin_shards(sd: dict, folder: Path, n: int = 2) -> None:
    """Write ``sd`` as HF's sharded pytorch_model-0000i-of-0000n.bin + pytorch_model.bin.index.json."""
    keys = list(sd)
    weight_map = {}
    for i in range(n):
        name = f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
        part = {k: sd[k] for k in keys[i::n]}
        torch.save(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama saved in every supported layout; returns (reference state dict, paths)."""
    root = tmp_path_factory.mktemp("llama")
    model = _tiny_llama()
    ref = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    (root / "bin").mkdir()
    model.config.save_pretrained(root / "bin")
    torch.save(model.state_dict(), root / "bin" / "pytorch_model.bin")
    (root / "bin_sharded").mkdir()
    _save_bin_shards(model.state_dict(), root / "bin_sharded")
    return ref, root


def _assert_same(src: Source, ref: dict) -> None:
    assert sorted(src.keys()) == sorted(ref)
    for k, v in ref.items():
        assert src.shape(k) == tuple(v.shape), k
        assert src.dtype(k) == v.dtype, k
        assert torch.equal(src.get(k), v), k


# ------------------------------------------------------------------------------------------ round trips

def test_safetensors_file_roundtrip(llama):
    ref, root = llama
    src = SafetensorsFileSource(root / "single" / "model.safetensors")
    assert src.space == "weight" and src.config_dir is None
    _assert_same(src, ref)
    # picklable (spawned workers): the handle is reopened lazily
    clone = pickle.loads(pickle.dumps(src))
    assert torch.equal(clone.get("lm_head.weight"), ref["lm_head.weight"])
    src.close()
    src.close()  # idempotent
    assert torch.equal(src.get("model.norm.weight"), ref["model.norm.weight"])  # reopens after close


@pytest.mark.parametrize("layout", ["single", "sharded", "bin", "bin_sharded"])
def test_hf_folder_roundtrip(llama, layout):
    ref, root = llama
    src = HFFolderSource(root / layout)
    assert src.config_dir == str(root / layout)
    if layout == "sharded":
        assert len(list((root / layout).glob("model-*.safetensors"))) > 1
        assert src.weights_file.name == "model.safetensors.index.json"
    _assert_same(src, ref)
    src.close()


def test_hf_folder_reads_headers_only(llama, monkeypatch):
    """Opening a folder and asking for names, shapes and dtypes reads no tensor data."""
    ref, root = llama

    def boom(self, key):
        raise AssertionError(f"tensor {key} read eagerly")

    monkeypatch.setattr(SafetensorsFileSource, "get", boom)
    src = HFFolderSource(root / "sharded")
    assert {k: src.shape(k) for k in src.keys()} == {k: tuple(v.shape) for k, v in ref.items()}


def test_index_file_path_and_torch_bin(llama):
    ref, root = llama
    _assert_same(open_source(root / "sharded" / "model.safetensors.index.json"), ref)
    src = TorchFileSource(root / "bin" / "pytorch_model.bin")
    assert src.entry is None  # a plain state dict
    _assert_same(src, ref)


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory):
    """A real Lightning checkpoint of a LightningModule holding the HF model as ``self.model``."""
    import lightning as L

    class Wrapper(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.save_hyperparameters({"lr": 0.1})
            self.model = _tiny_llama(seed=1)

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            return self.model(input_ids=ids, labels=ids).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Wrapper()
    ids = torch.randint(0, TINY["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    path = tmp_path_factory.mktemp("ckpt") / "run.ckpt"
    trainer.save_checkpoint(path)
    return path, {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def test_lightning_ckpt_roundtrip_and_alignment(lightning_ckpt, llama):
    path, ref = lightning_ckpt
    src = open_source(path)
    assert isinstance(src, TorchFileSource) and src.entry == "state_dict"
    assert all(k.startswith("model.") for k in src.keys())
    assert "model.model.embed_tokens.weight" in src.keys()
    aligned = align(src, ref.keys())
    _assert_same(aligned, ref)
    # the step changed the weights: the checkpoint is not the untrained init
    assert not torch.equal(aligned.get("model.norm.weight"), _tiny_llama(seed=1).model.norm.weight)


def test_engine_merges_ckpt_expert_into_hf_base(lightning_ckpt, llama):
    """θ0 + 1·(θ1 − θ0) through the engine reproduces the expert (base: HF folder, expert: .ckpt)."""
    path, ref = lightning_ckpt
    _, root = llama
    base = HFFolderSource(root / "sharded")
    plan = build_plan(base, [open_source(path)], TaskArithmetic(lambda_=1.0), weights=[1.0])
    merged = dict(run_plan(plan))
    assert sorted(merged) == sorted(ref)
    for k, v in ref.items():
        torch.testing.assert_close(merged[k], v, atol=1e-6, rtol=0)


def test_key_alignment_prefixes(llama):
    ref, root = llama
    src = HFFolderSource(root / "single")
    wrapped = StateDictSource({"_forward_module." + k: v for k, v in ref.items()}, label="<ddp>")
    aligned = align(wrapped, src.keys())
    assert sorted(aligned.keys()) == sorted(ref)
    assert torch.equal(aligned.get("lm_head.weight"), ref["lm_head.weight"])
    with pytest.raises(SourceError, match="none of its"):
        align(StateDictSource({"foo.bar": torch.zeros(1)}, label="<other>"), src.keys())


# ------------------------------------------------------------------------------------------ dispatch

def test_open_source_dispatch(llama, tmp_path):
    ref, root = llama
    assert isinstance(open_source(root / "single"), HFFolderSource)
    assert isinstance(open_source(str(root / "bin_sharded")), HFFolderSource)
    assert isinstance(open_source(root / "single" / "model.safetensors"), SafetensorsFileSource)
    assert isinstance(open_source(root / "bin" / "pytorch_model.bin"), TorchFileSource)
    pt = tmp_path / "w.pth"
    torch.save({"model": {"w": torch.ones(2)}, "step": 3}, pt)
    src = open_source(pt, label="mine")
    assert isinstance(src, TorchFileSource) and src.label == "mine" and src.entry == "model"
    assert src.keys() == ["w"]
    given = StateDictSource(ref)
    assert open_source(given) is given
    assert isinstance(open_source(ref), StateDictSource)
    assert isinstance(open_source(torch.nn.Linear(2, 2)), ModuleSource)


# ------------------------------------------------------------------------------------------ bad input

def test_missing_paths(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(SourceError, match="nope.*no such file or folder.*adapter_config.json"):
        open_source(missing)
    for cls in (SafetensorsFileSource, TorchFileSource, HFFolderSource):
        with pytest.raises(SourceError, match="nope"):
            cls(missing)
    with pytest.raises(SourceError, match="cannot open a int"):
        open_source(3)


def test_unknown_file_and_empty_folder(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("hi")
    with pytest.raises(SourceError, match=r"notes\.txt.*unrecognized.*safetensors"):
        open_source(txt)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="empty.*no model or adapter weights"):
        open_source(empty)
    with pytest.raises(SourceError, match=r"empty.*model\.safetensors"):
        HFFolderSource(empty)


def test_truncated_safetensors_fails_at_open(llama, tmp_path):
    _, root = llama
    data = (root / "single" / "model.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match=r"cut\.safetensors.*truncated"):
        SafetensorsFileSource(cut)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(data[:5])
    with pytest.raises(SourceError, match=r"tiny\.safetensors"):
        open_source(tiny)


def test_corrupted_safetensors_header(llama, tmp_path):
    _, root = llama
    data = bytearray((root / "single" / "model.safetensors").read_bytes())
    data[10:30] = b"\xff" * 20
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(SourceError, match=r"bad\.safetensors.*(corrupted|truncated)"):
        SafetensorsFileSource(bad)


def test_sharded_index_with_missing_shard(llama, tmp_path):
    _, root = llama
    folder = tmp_path / "partial"
    shutil.copytree(root / "sharded", folder)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(SourceError) as err:
        HFFolderSource(folder)
    assert "model.safetensors.index.json" in str(err.value) and shard.name in str(err.value)
    # an index placing a tensor in a shard that lacks it
    folder2 = tmp_path / "mixed"
    shutil.copytree(root / "sharded", folder2)
    index = json.loads((folder2 / "model.safetensors.index.json").read_text())
    first, other = sorted(set(index["weight_map"].values()))[:2]
    name = next(k for k, v in index["weight_map"].items() if v == first)
    index["weight_map"][name] = other
    (folder2 / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SourceError, match=rf"{name}.*{other}"):
        HFFolderSource(folder2)
    (folder2 / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(SourceError, match="index.json.*weight_map"):
        HFFolderSource(folder2)


def test_not_a_checkpoint_and_unsafe_pickle(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_text("this is not a checkpoint")
    with pytest.raises(SourceError, match=r"junk\.ckpt.*not a PyTorch checkpoint"):
        open_source(junk)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": _Custom()}, unsafe)
    with pytest.raises(SourceError, match=r"unsafe\.pt.*weights_only=False"):
        TorchFileSource(unsafe)
    assert TorchFileSource(unsafe, weights_only=False).keys() == ["w"]
    nodict = tmp_path / "list.pt"
    torch.save([torch.ones(1)], nodict)
    with pytest.raises(SourceError, match=r"list\.pt.*not a state dict"):
        TorchFileSource(nodict)
    notensor = tmp_path / "meta.pt"
    torch.save({"epoch": 3}, notensor)
    with pytest.raises(SourceError, match=r"meta\.pt.*state_dict_key"):
        TorchFileSource(notensor)
    src = TorchFileSource(unsafe, weights_only=False)
    with pytest.raises(SourceError, match="has no tensor 'x'"):
        src.get("x")


class _Custom:
    """A class torch.load(weights_only=True) refuses to unpickle."""


def test_expert_of_another_architecture_is_refused_before_output(tmp_path):
    """A 3-layer expert against a 2-layer base: one clear error naming both folders, no output."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_merge import IncompatibleTensorError, TaskArithmetic, merge_models

    cfg = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **cfg)).save_pretrained(tmp_path / "base")
    LlamaForCausalLM(LlamaConfig(num_hidden_layers=3, **cfg)).save_pretrained(tmp_path / "deeper")
    with pytest.raises(IncompatibleTensorError, match=r"deeper.*num_hidden_layers: base 2 vs expert 3"):
        merge_models(tmp_path / "base", [tmp_path / "deeper"], TaskArithmetic(), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
