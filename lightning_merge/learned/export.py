"""Export a learned merge as a plain model, with its coefficients and a plot of them by layer.

The merged tensors are built one at a time (no_grad) and streamed to the package's atomic
writers (:func:`~lightning_merge.targets.hf.save_hf_folder`), so exporting needs O(largest tensor)
extra memory. The written model is the wrapped model's state dict with every target tensor
replaced by θ*(c): loading it with ``from_pretrained`` gives the wrapper's outputs up to the
export dtype's rounding (float32 by default: identical arithmetic). With ``target_only`` only the
target submodule is written (names relative to it, the target's own ``config``): e.g. the merged
encoder of a :class:`~lightning_merge.examples.encoder.TaskLogits` wrapper, without its heads.

Files in the subfolder ``learned_coefficients/`` (a subfolder, so that a loader globbing
``*.safetensors`` or ``from_pretrained`` never mistakes the coefficients, which carry the model's
tensor names, for weights):

* ``coefficients.safetensors``: the effective coefficients of every tensor,
  ``[models]`` or ``[models, size]`` (metadata: granularity, coefficient_fn, the model labels);
* ``coefficients.json``: the same, with vectors summarized (mean, min, max per model);
* ``coefficients.png``: mean coefficient per layer (block or module) and model
  (matplotlib, Agg backend; skipped with a warning when matplotlib is missing).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..lightning.diagnostics import group_of
from ..sources.base import ModuleSource
from ..targets.atomic import atomic_file
from ..targets.hf import save_hf_folder
from .sharded import gather_merged

log = logging.getLogger(__name__)

#: the subfolder of an export that holds the coefficients and their plot
COEFFICIENTS_DIR = "learned_coefficients"
COEFFICIENTS_ST = f"{COEFFICIENTS_DIR}/coefficients.safetensors"
COEFFICIENTS_JSON = f"{COEFFICIENTS_DIR}/coefficients.json"
COEFFICIENTS_PNG = f"{COEFFICIENTS_DIR}/coefficients.png"

__all__ = ["export_model", "plot_coefficients", "save_coefficients"]


def _model_labels(module: Any) -> list[str]:
    labels = [os.path.basename(os.path.normpath(str(x))) or str(x) for x in module.bank.labels]
    return labels + (["base"] if module.coefficients.include_base else [])


def _target(module: Any) -> Any:
    return module.model.get_submodule(module.target_name) if module.target_name else module.model


@torch.no_grad()
def iter_merged(module: Any, dtype: torch.dtype | None, *, target_only: bool = False) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` of the wrapped model's state dict with the target tensors merged (with
    ``target_only``: of the target submodule's state dict, names relative to it)."""
    root, prefix = (_target(module), "") if target_only else (module.model, module.prefix)
    aliases = ModuleSource(root).aliases
    bank = module.load_bank() if hasattr(module, "load_bank") else module.bank
    merged_names = set(bank.names)
    for key, value in root.state_dict().items():
        kept = aliases.get(key, key)
        short = kept[len(prefix):] if kept.startswith(prefix) else None
        if short is not None and short in merged_names:
            t = module.coefficients.merged(bank, short)
        else:
            t = value.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        yield key, t.cpu().contiguous()


def export_model(module: Any, path: str | os.PathLike | None, *, dtype: torch.dtype | None = torch.float32,
                 overwrite: bool = False, coefficients: bool = True, plot: bool = True,
                 target_only: bool = False) -> dict[str, Tensor] | Path:
    """See :meth:`LearnedMerge.export <lightning_merge.learned.LearnedMerge.export>`.

    A sharded module (``ModelParallelStrategy``) is exported collectively: every rank calls this,
    the tensors are gathered one at a time, rank 0 writes them (the others return ``path``)."""
    sharded = bool(getattr(module, "_sharded", False))
    merged = (lambda: gather_merged(module, dtype, target_only=target_only)) if sharded else (
        lambda: iter_merged(module, dtype, target_only=target_only))
    if path is None:
        return dict(merged())
    from ..preflight import check_output

    inputs = list(getattr(module, "input_paths", []))
    rank = _rank() if sharded else 0
    problem = None
    if rank == 0:
        try:
            check_output(path, inputs, overwrite)
        except Exception as e:  # every rank must learn it before the gathers start
            problem = e
    if sharded:
        import torch.distributed as dist

        shared = [problem]
        dist.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem is not None:
        raise problem
    if rank != 0:
        for _ in merged():  # take part in every gather
            pass
        return Path(path)
    whole = not target_only or not module.target_name
    def finish(folder: Path) -> None:  # inside the temporary folder: the export appears whole
        if coefficients:
            save_coefficients(module, folder)
        if plot:
            plot_coefficients(module, folder / COEFFICIENTS_PNG)

    with tempfile.TemporaryDirectory(prefix="lm-config-") as tmp:
        config_dir = module.model_path if whole else None
        cfg = getattr(module.model if whole else _target(module), "config", None)
        if config_dir is None and cfg is not None and hasattr(cfg, "save_pretrained"):
            cfg.save_pretrained(tmp)
            config_dir = tmp
        out = save_hf_folder(merged(), path, config_dir=config_dir,
                             overwrite=overwrite, inputs=inputs, finish=finish,
                             metadata={"lightning_merge_method": f"learned_{module.granularity}"})
    return out


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def save_coefficients(module: Any, folder: str | os.PathLike) -> list[Path]:
    """Write ``learned_coefficients/coefficients.safetensors`` and ``.json`` into ``folder``; returns their paths."""
    from safetensors.torch import save_file

    folder = Path(folder)
    (folder / COEFFICIENTS_DIR).mkdir(parents=True, exist_ok=True)
    table = module.coefficients.table()
    labels = _model_labels(module)
    meta = {"granularity": module.granularity, "coefficient_fn": module.coefficients.fn, "models": json.dumps(labels)}
    st = folder / COEFFICIENTS_ST
    atomic_file(st, lambda p: save_file({k: v.contiguous() for k, v in table.items()}, str(p), metadata=meta))
    summary: dict[str, Any] = {"granularity": module.granularity, "coefficient_fn": module.coefficients.fn,
                               "models": labels, "tensors": {}}
    for name, c in table.items():
        if c.dim() == 1:
            summary["tensors"][name] = [float(v) for v in c]
        else:
            summary["tensors"][name] = {"mean": c.mean(1).tolist(), "min": c.min(1).values.tolist(),
                                        "max": c.max(1).values.tolist(), "size": int(c.shape[1])}
    js = folder / COEFFICIENTS_JSON
    atomic_file(js, lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))
    return [st, js]


def layer_means(module: Any) -> tuple[list[str], list[list[float]]]:
    """(layers in model order, [model][layer] mean effective coefficient) of the trained tensors
    (all tensors when none is trained separately, e.g. task granularity)."""
    table = module.coefficients.table()
    slots = {s.name: s for s in module.coefficients.slots}
    names = [n for n in table if n not in slots or slots[n].trainable] or list(table)
    groups: dict[str, list[Tensor]] = {}
    for n in names:
        c = table[n]
        groups.setdefault(group_of(n), []).append(c if c.dim() == 1 else c.mean(1))
    layers = list(groups)
    means = torch.stack([torch.stack(v).mean(0) for v in groups.values()], 1)  # [models, layers]
    return layers, means.tolist()


def plot_coefficients(module: Any, path: str | os.PathLike) -> Path | None:
    """Mean coefficient per layer and model, as a PNG (None when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no coefficient plot written (pip install matplotlib)")
        return None
    layers, means = layer_means(module)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(layers) + 2), 4))
    for label, row in zip(_model_labels(module), means):
        ax.plot(range(len(layers)), row, marker="o", label=label)
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("mean effective coefficient")
    ax.set_title(f"learned merge coefficients ({module.granularity})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_file(out, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)
    return out
