"""Shared by tests/test_method_tsv.py and tests/test_method_isotropic.py: tiny Llama folders and
the ``lightning-merge merge`` runner for the end-to-end tests, and the reference functions of
FusionBench 0.2.33 (TSV-M, Iso-C, Iso-CTS), loaded standalone.

FusionBench's package imports omegaconf, hydra, lightning etc. on import, so it is not installed
into the venv. Its merge functions are plain torch: this module reads the source of one module of
the wheel (``fusion_bench/method/...``), drops its ``fusion_bench`` imports, defines the two names
they provided (``StateDictType``, a type alias: ``dict``; ``timeit_context``, a timing context
manager: ``contextlib.nullcontext``) and executes the rest unchanged. The functions' own code is
FusionBench's, byte for byte.

Where the wheel is found, in order: ``$FUSION_BENCH_WHEEL`` (the ``.whl`` file, a folder holding
it, or an unpacked wheel: a folder with ``fusion_bench/``), then ``/tmp/fb`` (where
``pip download fusion-bench==0.2.33 --no-deps -d /tmp/fb`` puts it), then an installed
``fusion_bench``. Without one, :func:`reference` calls ``pytest.skip`` with the reason.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

ISO = "fusion_bench/method/isotropic_merging/iso_utils.py"
TSV = "fusion_bench/method/task_singular_vector/utils/TSVM_utils.py"
DEFAULT_DIR = Path("/tmp/fb")
#: where the repository keeps the reference wheels (searched after DEFAULT_DIR)
REPO_WHEELS = Path(__file__).resolve().parents[1] / ".venv" / "reference-wheels"


def _source(relpath: str) -> str | None:
    """The text of ``relpath`` inside the first FusionBench found (None: none found)."""
    places: list[Path] = []
    if os.environ.get("FUSION_BENCH_WHEEL"):
        places.append(Path(os.environ["FUSION_BENCH_WHEEL"]))
    places.extend([DEFAULT_DIR, REPO_WHEELS])
    for place in places:
        candidates = [place] if place.is_file() else sorted(place.glob("fusion_bench-*.whl")) if place.is_dir() else []
        for whl in candidates:
            with zipfile.ZipFile(whl) as z, contextlib.suppress(KeyError):
                return z.read(relpath).decode()
        for root in (place, place / "unpacked"):
            if (root / relpath).is_file():
                return (root / relpath).read_text()
    spec = importlib.util.find_spec("fusion_bench")
    if spec is not None and spec.submodule_search_locations:
        f = Path(next(iter(spec.submodule_search_locations))).parent / relpath
        if f.is_file():
            return f.read_text()
    return None


def reference(relpath: str, name: str, *, functions_only: bool = False) -> Callable[..., Any]:
    """FusionBench's function ``name`` from module ``relpath`` (its prints silenced), or a skip.

    ``functions_only``: keep only the module's imports (not relative ones) and function
    definitions, for modules whose classes need the rest of FusionBench (RegMean, Fisher)."""
    text = _source(relpath)
    if text is None:
        pytest.skip("FusionBench 0.2.33 not found: run `pip download fusion-bench==0.2.33 --no-deps -d /tmp/fb` "
                    "or set FUSION_BENCH_WHEEL to the wheel")
    tree = ast.parse(text)
    tree.body = [n for n in tree.body
                 if not (isinstance(n, ast.ImportFrom) and (n.module or "").startswith("fusion_bench"))]
    if functions_only:
        tree.body = [n for n in tree.body if isinstance(n, ast.FunctionDef)
                     or (isinstance(n, ast.Import) and not any(a.name.startswith("fusion_bench") for a in n.names))
                     or (isinstance(n, ast.ImportFrom) and n.level == 0)]
    namespace: dict[str, Any] = {"StateDictType": dict, "timeit_context": contextlib.nullcontext}
    exec(compile(tree, relpath, "exec"), namespace)
    fn = namespace[name]

    def quiet(*args: Any, **kwargs: Any) -> Any:
        with contextlib.redirect_stdout(io.StringIO()):
            return fn(*args, **kwargs)

    return quiet


def make_llamas(root: Path, n_experts: int = 3, hidden: int = 32) -> Path:
    """``root``/base and e0.. (tiny float32 Llama HF folders): e_i = base + N(0, (0.01 (i + 1))²)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def cfg() -> LlamaConfig:
        return LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=128)

    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg())
    base.save_pretrained(root / "base")
    gen = torch.Generator().manual_seed(1)
    for i in range(n_experts):
        m = LlamaForCausalLM(cfg())
        m.load_state_dict({k: v + 0.01 * (i + 1) * torch.randn(v.shape, generator=gen)
                           for k, v in base.state_dict().items()})
        m.save_pretrained(root / f"e{i}")
    return root


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder's safetensors files."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def run_merge_cli(config: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    """``lightning-merge merge CONFIG OUT`` (exit status 0 asserted); the merged tensors."""
    from lightning_merge.cli import main

    cfg = out.with_suffix(".yaml")
    cfg.write_text(yaml.safe_dump(config))
    assert main(["merge", str(cfg), str(out), "--no-progress"]) == 0
    return load_folder(out)
