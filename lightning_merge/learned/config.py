"""Validation of :class:`~lightning_merge.learned.LearnedMerge` arguments and model building.

Everything here runs in ``__init__``, before any model is read: a bad value raises
:class:`~lightning_merge.errors.ConfigError` naming the argument and what would fix it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["STORAGE_DTYPES", "build_model", "check_args", "check_path", "pair_expert_tasks"]

STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CHOICES: dict[str, tuple[str, ...]] = {
    "granularity": ("task", "tensor", "column"),
    "coefficient_fn": ("identity", "tanh", "sigmoid", "relu", "softmax"),
    "objective": ("entropy", "dam", "task"),
    "kl_normalization": ("reference", "per_token"),
    "optimizer": ("adam", "adamw"),
    "storage_dtype": tuple(STORAGE_DTYPES),
    "export_dtype": tuple(STORAGE_DTYPES),
    "vocab_policy": ("truncate", "pad_mean", "error"),
}


def _err(who: str, msg: str) -> ConfigError:
    return ConfigError(f"{who}: {msg}")


def check_path(who: str, arg: str, value: Any) -> Any:
    """Paths must exist now (in-memory modules and state dicts pass through)."""
    if isinstance(value, (str, os.PathLike)):
        if not Path(value).expanduser().exists():
            raise _err(who, f"{arg} = '{value}': no such file or folder. Pass a local Hugging Face model folder, a "
                            "PEFT LoRA adapter folder, a .safetensors file or a .ckpt/.pt/.bin checkpoint (download "
                            "Hub models first)")
        return os.fspath(value)
    if isinstance(value, (nn.Module, Mapping)):
        return value
    raise _err(who, f"{arg} must be a path, an nn.Module or a state dict, got {type(value).__name__} {value!r}")


def _finite(who: str, arg: str, value: Any, *, lo: float | None = None, lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _err(who, f"{arg} must be a finite number, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise _err(who, f"{arg} = {value} must be {'>' if lo_open else '>='} {lo}")


def check_args(who: str, a: Mapping[str, Any]) -> None:
    """Check the scalar arguments ``a`` (a dict of the constructor's arguments)."""
    for arg, choices in _CHOICES.items():
        if arg in a and a[arg] not in choices:
            raise _err(who, f"{arg} = {a[arg]!r} is not one of {list(choices)}")
    experts = a.get("experts")
    if isinstance(experts, (str, os.PathLike)) or not isinstance(experts, Sequence) or not experts:
        raise _err(who, f"experts must be a non-empty list of expert models (paths, modules or state dicts), got "
                        f"{experts!r}")
    if a.get("init") is not None:
        _finite(who, "init", a["init"])
        if a.get("coefficient_fn") == "softmax":
            raise _err(who, f"init = {a['init']} has no effect with coefficient_fn='softmax' (the coefficients start "
                            "uniform, 1/models); leave init unset or use another coefficient_fn")
    if a.get("granularity") != "column":
        for arg in ("include_base", "merge_embeddings", "merge_norms"):
            if a.get(arg):
                raise _err(who, f"{arg}=True only applies to granularity='column' (DAM), not "
                                f"'{a.get('granularity')}'; set granularity='column' or drop {arg}")
    bias_init = a.get("bias_init", "uniform")
    if isinstance(bias_init, str):
        if bias_init not in ("uniform", "sum"):
            raise _err(who, f"bias_init = {bias_init!r}: use 'uniform' (1/models: the merge starts as the uniform "
                            "soup), 'sum' (1.0 each, the DAM reference: biases summed) or a number")
    else:
        _finite(who, "bias_init", bias_init)
    clamp = a.get("clamp")
    if clamp is not None:
        if not isinstance(clamp, Sequence) or len(clamp) != 2:
            raise _err(who, f"clamp must be two numbers [lo, hi] or None, got {clamp!r}")
        for v in clamp:
            _finite(who, "clamp", v)
        if not clamp[0] < clamp[1]:
            raise _err(who, f"clamp = {list(clamp)}: lo must be below hi")
    _finite(who, "temperature", a.get("temperature", 1.0), lo=0.0, lo_open=True)
    _finite(who, "lr", a.get("lr", 1.0), lo=0.0, lo_open=True)
    for arg in ("similarity_weight", "l1_weight", "l2_weight", "weight_decay"):
        _finite(who, arg, a.get(arg, 0.0), lo=0.0)
    tasks = a.get("expert_tasks")
    if tasks is not None:
        if not isinstance(tasks, Sequence) or isinstance(tasks, str) or len(tasks) != len(experts):
            raise _err(who, f"expert_tasks must name one data task per expert ({len(experts)}), got {tasks!r}")
        if len(set(tasks)) != len(tasks):
            raise _err(who, f"expert_tasks {list(tasks)} names a task twice; each expert needs its own data")
    if a.get("model_kwargs") is not None and not isinstance(a["model_kwargs"], Mapping):
        raise _err(who, f"model_kwargs must be a dict of from_pretrained arguments, got {a['model_kwargs']!r}")


def pair_expert_tasks(expert_tasks: list[str] | None, names: Sequence[str] | None, n: int) -> list[str] | None:
    """``objective="dam"``: the data task of each of the ``n`` experts, checked against the data
    module's task ``names`` (default: its first ``n`` tasks)."""
    if expert_tasks is None:
        if not names or len(names) < n:
            raise ConfigError(f"LearnedMerge: objective='dam' pairs each of the {n} experts with its task's "
                              f"data, but the data module names {list(names or [])}; set expert_tasks")
        return list(names)[:n]
    if names:
        missing = [t for t in expert_tasks if t not in names]
        if missing:
            raise ConfigError(f"LearnedMerge: expert_tasks {missing} are not tasks of the data module ({list(names)})")
    return expert_tasks


def build_model(who: str, spec: Any, model_class: str = "auto", model_kwargs: Mapping[str, Any] | None = None
                ) -> tuple[nn.Module, str | None]:
    """The model to merge into and the folder it came from (None for a module given in memory).

    A folder is built with ``transformers.<model_class>`` (``model_class="auto"``: the first of
    ``architectures`` in its config.json, else ``AutoModel``) with its parameters on the meta device,
    to be read when the module is set up (:mod:`.meta`); where that cannot give exactly what
    ``from_pretrained`` gives (e.g. a head the checkpoint lacks), it is loaded in float32 with
    ``from_pretrained`` now, and one INFO line says why.
    """
    if isinstance(spec, nn.Module):
        return spec, None
    if not isinstance(spec, (str, os.PathLike)):
        raise _err(who, f"model must be a Hugging Face model folder or an nn.Module, got {type(spec).__name__}")
    path = Path(spec).expanduser()
    cfg = path / "config.json"
    if not cfg.is_file():
        raise _err(who, f"model = '{spec}' is not a Hugging Face model folder (no config.json there); pass the base "
                        "model's folder or an nn.Module")
    import transformers

    if model_class == "auto":
        try:
            arch = (json.loads(cfg.read_text()).get("architectures") or [None])[0]
        except ValueError as e:
            raise _err(who, f"model = '{spec}': config.json is not valid JSON ({e})") from None
        cls = getattr(transformers, arch, None) if arch else None
        cls = cls or transformers.AutoModel
    else:
        cls = getattr(transformers, model_class, None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            raise _err(who, f"model_class = '{model_class}' is not a transformers model class (e.g. "
                            "'AutoModelForCausalLM', 'AutoModelForSequenceClassification', or 'auto')")
    from .meta import build_skeleton

    model, why = build_skeleton(path, cls, model_kwargs)
    if model is None:
        log.info("%s: model '%s' is loaded whole in __init__ (from_pretrained; under ModelParallelStrategy every "
                 "rank holds it before sharding) because %s", who, spec, why)
        model = cls.from_pretrained(str(path), dtype=torch.float32, **dict(model_kwargs or {}))
    return model, str(path)
