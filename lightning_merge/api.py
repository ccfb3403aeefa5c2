"""The one-call Python API: :func:`merge_models`."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .engine import TensorParams, VocabPolicy, build_plan, run_plan
from .errors import ConfigError
from .methods.base import MergeMethod
from .sources.base import ModuleSource, Source

log = logging.getLogger(__name__)

SourceSpec = str | os.PathLike | Mapping[str, Tensor] | nn.Module | Source
OutFormat = Literal["hf", "safetensors", "peft"]


def _open(spec: SourceSpec, label: str | None = None) -> Source:
    from .sources.resolve import open_source

    return open_source(spec, label=label)


def merge_models(
    base: SourceSpec | None,
    experts: Sequence[SourceSpec],
    method: MergeMethod,
    *,
    weights: Sequence[float] | None = None,
    seed: int = 0,
    out: str | os.PathLike | nn.Module | None = None,
    device: str | torch.device = "cpu",
    out_dtype: torch.dtype | str | None = None,
    vocab_policy: VocabPolicy = "truncate",
    strict: bool = False,
    tensor_params: TensorParams | None = None,
    progress: bool | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    out_format: OutFormat | None = None,
    adapter_rank: int = 16,
) -> dict[str, Tensor] | nn.Module | Path | Any:
    """Merge ``experts`` into ``base`` with ``method`` and return or write the result.

    Args:
        base: the pre-trained model (HF folder, .safetensors, .ckpt, state dict or module). With
            ``out`` a module and ``base=None``, the module's own weights are the base.
        experts: fine-tuned models or PEFT LoRA adapter folders, freely mixed.
        method: a merge method, e.g. ``Ties(density=0.2)`` or ``get_method("della", ...)``.
        weights: one weight per expert (default 1 each).
        seed: global seed; each (tensor, expert) draws from its own generator.
        out: None -> return a state dict; an ``nn.Module`` -> merge into it in place (its previous
            weights are kept on ``module._lightning_merge_backup``, a
            :class:`~lightning_merge.targets.module.WeightBackup`); a path -> write it atomically
            in ``out_format``.
        out_format: ``"hf"`` (default for folders: sharded safetensors, config and tokenizer
            files copied from the base folder), ``"safetensors"`` (one file; default for a path
            ending in ``.safetensors``) or ``"peft"`` (a LoRA adapter of rank ``adapter_rank``
            made from the merged delta by truncated SVD; the relative reconstruction error of
            every module is logged and returned: the result is then a
            :class:`~lightning_merge.targets.peft_adapter.LoraExportReport`, a dict module ->
            error, with ``.path``).
        adapter_rank: the LoRA rank of ``out_format="peft"``.
        device: where the arithmetic runs ("cpu", "cuda", ...). Inputs and outputs stay on CPU.
        out_dtype: dtype of the merged floating tensors (default: each base tensor's dtype).
        vocab_policy: "truncate" (mergekit-compatible) or "error" for resized embeddings.
        strict: error, instead of copying, on tensors the base lacks.
        tensor_params: per-tensor overrides ``name -> {param: value, "weights": [...]}``.
        progress: show a progress bar (None: only on long merges in a terminal).
        overwrite: replace an existing output folder.
    """
    t0 = time.perf_counter()
    if isinstance(out_dtype, str):
        out_dtype = parse_dtype(out_dtype)
    if isinstance(out, (str, os.PathLike)):
        from .targets.atomic import check_output_dir

        if out_format is None:
            out_format = "safetensors" if str(out).endswith(".safetensors") else "hf"
        if out_format not in ("hf", "safetensors", "peft"):
            raise ConfigError(f"out_format '{out_format}' is not one of ['hf', 'safetensors', 'peft']")
        if out_format == "peft" and base is None:
            raise ConfigError("out_format='peft' stores merged - base: pass the base model")
        if out_format == "peft" and (not isinstance(adapter_rank, int) or adapter_rank < 1):
            raise ConfigError(f"adapter_rank must be a positive integer, got {adapter_rank!r}")
        check_output_dir(out, overwrite)
    opened: list[Source] = []
    try:
        if base is None and isinstance(out, nn.Module):
            base_src: Source | None = ModuleSource(out, label="<module being merged>")
        else:
            base_src = None if base is None else _open(base, label=None)
        if base_src is not None:
            opened.append(base_src)
        expert_srcs = [_open(e) for e in experts]
        opened.extend(expert_srcs)
        plan = build_plan(
            base_src, expert_srcs, method, weights=weights, seed=seed, device=device,
            out_dtype=out_dtype, vocab_policy=vocab_policy, strict=strict, tensor_params=tensor_params,
        )
        stream = run_plan(plan, progress=progress)
        layout = [(t.name, t.shape, t.out_dtype) for t in plan.tasks]
        if out is None:
            result: Any = dict(stream)
        elif isinstance(out, nn.Module):
            from .targets.module import load_into_module

            backup = load_into_module(out, stream, strict=strict)
            out._lightning_merge_backup = backup  # type: ignore[assignment]
            result = out
        elif out_format == "safetensors":
            from .targets.shards import save_state_dict_file

            result = save_state_dict_file(stream, out, overwrite=overwrite, layout=layout,
                                          metadata={"lightning_merge_method": method.name})
        elif out_format == "peft":
            result = _save_adapter(stream, base_src, base, out, adapter_rank, overwrite)
        else:
            from .targets.hf import save_hf_folder

            padded = [t.pad_rows for t in plan.tasks if t.pad_rows is not None]
            result = save_hf_folder(
                stream, out, config_dir=getattr(base_src, "config_dir", None), overwrite=overwrite,
                max_shard_bytes=max_shard_bytes, layout=layout,
                metadata={"lightning_merge_method": method.name},
                config_updates={"vocab_size": max(padded)} if padded else None,
            )
    finally:
        for s in opened:
            s.close()
    log.info("merged %d experts with %s in %.2f s", len(experts), method.name, time.perf_counter() - t0)
    return result


def _save_adapter(stream, base_src: Source, base: Any, out, rank: int, overwrite: bool) -> Any:
    """Turn merged tensors into merged - base deltas and factorize them into a LoRA adapter."""
    from .targets.peft_adapter import save_lora_adapter

    def deltas():
        for name, merged in stream:
            if merged.is_floating_point() and name in base_keys:
                yield name, merged.to(torch.float32) - base_src.get(name).to(torch.float32)

    base_keys = set(base_src.keys())
    label = str(base) if isinstance(base, (str, os.PathLike)) else None
    report = save_lora_adapter(deltas(), out, rank=rank, base_model_name_or_path=label, overwrite=overwrite)
    if report:
        errs = sorted(report.values())
        log.info("LoRA adapter rank %d: %d modules, relative error median %.3g, max %.3g",
                 rank, len(errs), errs[len(errs) // 2], errs[-1])
    return report


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def parse_dtype(name: str) -> torch.dtype:
    """'bfloat16' / 'bf16' / 'float16' / 'float32' ... -> torch.dtype."""
    key = name.strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ConfigError(f"unknown dtype '{name}'; use one of {sorted(_DTYPES)}")
    return _DTYPES[key]
