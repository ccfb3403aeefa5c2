"""Shared pieces of the data-safety and fault-injection tests: tiny saved models, YAML, comparison."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128)


def save_llamas(root: Path, n_experts: int = 2, config: dict | None = None, scale: float = 0.02) -> Path:
    """root/base and root/e0.. (base + seeded noise), tiny Llama HF folders."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**(config or TINY))
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    gen = torch.Generator().manual_seed(1)
    for i in range(n_experts):
        torch.manual_seed(0)
        m = LlamaForCausalLM(cfg)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(scale * torch.randn(p.shape, generator=gen))
        m.save_pretrained(root / f"e{i}")
    return root


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def ties_config(root: Path, n_experts: int = 2) -> dict:
    return {"merge_method": "ties", "base_model": str(root / "base"),
            "models": [{"model": str(root / f"e{i}"), "parameters": {"weight": 1.0, "density": 0.5}}
                       for i in range(n_experts)],
            "parameters": {"normalize": True}}


def tensors(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder or a .safetensors file."""
    files = [out] if out.is_file() else sorted(out.glob("*.safetensors"))
    merged: dict[str, torch.Tensor] = {}
    for f in files:
        merged.update(load_file(str(f)))
    return merged


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.bfloat16 else a[k], b[k].view(
            torch.uint8) if b[k].dtype == torch.bfloat16 else b[k]), k


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """(size, mtime, first bytes) of every file under ``folder``: proof that inputs were not touched."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            with open(p, "rb") as f:
                out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns, f.read(4096))
    return out


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``lightning-merge`` in a fresh process (one torch thread)."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
         **(env or {})}
    return subprocess.run([sys.executable, "-m", "lightning_merge.cli", *args], capture_output=True, text=True,
                          env=e, timeout=timeout)


@contextlib.contextmanager
def tmpfs(path: Path, size: str, readonly: bool = False):
    """A real tmpfs mounted at ``path`` (root only); yields False when it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def leftovers(parent: Path, name: str) -> list[str]:
    """Siblings of ``parent/name`` that a run on it may have left (temporary, old or lock files)."""
    return sorted(p.name for p in parent.iterdir() if p.name != name and name in p.name)
