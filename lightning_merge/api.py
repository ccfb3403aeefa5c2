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
from .targets.module import is_sharded

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
        method: a merge method, e.g. ``Ties(density=0.2)``, ``get_method("della", ...)`` or a name
            (``"ties"``: :func:`~lightning_merge.methods.get_method` with its defaults).
        weights: one weight per expert (default 1 each).
        seed: global seed; each (tensor, expert) draws from its own generator.
        out: None -> return a state dict; an ``nn.Module`` -> merge into it in place (its previous
            weights are kept on ``module._lightning_merge_backup``, a
            :class:`~lightning_merge.targets.module.WeightBackup`); a path -> write it atomically
            in ``out_format``. A module sharded with FSDP2 (``fully_shard``: DTensor parameters)
            is merged shard by shard: call this on every rank of the default process group; each
            tensor is merged by one rank and each rank receives only its shard
            (:mod:`lightning_merge.lightning.sharded`).
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
        overwrite: replace an existing output folder. An output that is, contains or lies inside
            the base or an expert is refused even so (real paths, symlinks followed).

    Every argument is checked before anything is read or written
    (:mod:`lightning_merge.preflight`): a bad type or value, an unavailable device, an output that
    would destroy an input, an unwritable location or too little free space raise one
    :class:`~lightning_merge.errors.ConfigError` / :class:`~lightning_merge.errors.OutputError`.
    One summary line is logged at INFO on the ``lightning_merge.api`` logger.
    """
    from . import preflight

    t0 = time.perf_counter()
    method = preflight.check_method(method)
    experts = preflight.check_experts(experts)
    seed = preflight.check_seed(seed)
    device = preflight.resolve_device(device)
    for flag, value in (("overwrite", overwrite), ("strict", strict)):
        preflight.check_flag(value, flag)
    if isinstance(out_dtype, str):
        out_dtype = parse_dtype(out_dtype)
    elif out_dtype is not None and not isinstance(out_dtype, torch.dtype):
        raise ConfigError(f"out_dtype must be a torch.dtype or a name such as 'bfloat16', got {out_dtype!r}")
    if weights is not None and (isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence)):
        raise ConfigError(f"weights must be a list with one number per expert, got {weights!r}")
    inputs = preflight.input_paths([base, *experts])
    if isinstance(out, (str, os.PathLike)):
        if out_format is None:
            out_format = "safetensors" if str(out).endswith(".safetensors") else "hf"
        if out_format not in ("hf", "safetensors", "peft"):
            raise ConfigError(f"out_format '{out_format}' is not one of ['hf', 'safetensors', 'peft']")
        if out_format == "peft" and base is None:
            raise ConfigError("out_format='peft' stores merged - base: pass the base model")
        if out_format == "peft" and (isinstance(adapter_rank, bool) or not isinstance(adapter_rank, int)
                                     or adapter_rank < 1):
            raise ConfigError(f"adapter_rank must be a positive integer, got {adapter_rank!r}")
        preflight.check_output(out, [base, *experts], overwrite)
    elif out is not None and not isinstance(out, nn.Module):
        raise ConfigError(f"out must be None (return a state dict), a path or an nn.Module, got "
                          f"{type(out).__name__}")
    opened: list[Source] = []
    sharded = isinstance(out, nn.Module) and is_sharded(out)
    try:
        if base is None and sharded:
            from .lightning.sharded import GatheredBase

            base_src: Source | None = GatheredBase(out, "<sharded module being merged>")
        elif base is None and isinstance(out, nn.Module):
            base_src = ModuleSource(out, label="<module being merged>")
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
        layout = [(t.name, t.shape, t.out_dtype) for t in plan.tasks]
        inputs += preflight.input_paths([base_src, *expert_srcs])
        stream = run_plan(plan, progress=progress, delta=out_format == "peft")
        if out is None:
            result: Any = dict(stream)
            where = "a state dict"
        elif sharded:
            from .lightning.ranks import Comm
            from .lightning.sharded import merge_into_shards
            from .targets.module import WeightBackup

            names = [t.name for t in plan.tasks]
            out._lightning_merge_backup = WeightBackup(out, names)  # type: ignore[assignment]
            merge_into_shards(plan, plan.tasks, out, Comm(), base_src if base is None else None)
            result = out
            where = f"the sharded module {type(out).__name__}"
        elif isinstance(out, nn.Module):
            from .targets.module import load_into_module

            backup = load_into_module(out, stream, strict=strict)
            out._lightning_merge_backup = backup  # type: ignore[assignment]
            result = out
            where = f"the module {type(out).__name__}"
        elif out_format == "safetensors":
            from .targets.shards import save_state_dict_file

            result = save_state_dict_file(stream, out, overwrite=overwrite, layout=layout, inputs=inputs,
                                          metadata={"lightning_merge_method": method.name})
            where = f"'{out}'"
        elif out_format == "peft":
            from .targets.peft_adapter import save_lora_adapter

            label = str(base) if isinstance(base, (str, os.PathLike)) else None
            result = save_lora_adapter(stream, out, rank=adapter_rank, base_model_name_or_path=label,
                                       overwrite=overwrite, inputs=inputs)
            where = f"the LoRA adapter '{out}' (rank {adapter_rank})"
        else:
            from .targets.hf import save_hf_folder

            padded = [t.pad_rows for t in plan.tasks if t.pad_rows is not None]
            result = save_hf_folder(
                stream, out, config_dir=getattr(base_src, "config_dir", None), overwrite=overwrite,
                max_shard_bytes=max_shard_bytes, layout=layout, inputs=inputs,
                metadata={"lightning_merge_method": method.name},
                config_updates={"vocab_size": max(padded)} if padded else None,
            )
            where = f"'{out}'"
    finally:
        for s in opened:
            s.close()
    nbytes = sum(t.numel * torch.empty((), dtype=t.out_dtype).element_size() for t in plan.tasks)
    log.info("merged %d expert(s) with %s: %d tensors (%.1f MB) into %s in %.2f s", len(experts),
             method.name, len(plan.tasks), nbytes / 1e6, where, time.perf_counter() - t0,
             extra={SUMMARY: True})
    return result


#: ``extra`` key marking the one summary line a merge logs (the CLI prints its own instead)
SUMMARY = "lightning_merge_summary"


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
